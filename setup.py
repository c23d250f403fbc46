"""Build ep_kernels (with its compiled C++ ops) and the independent reference ep_reference.

torch must be importable at build time, and the extension is only valid for the torch it
was built against. So we build *without* build isolation, against the torch that is
installed (README: ``pip install --no-build-isolation .``), and record that torch's version
in ``ep_kernels/_build_info.py``; at import the package refuses to use a compiled backend
built for another torch (see ``ep_kernels/_ext.py``).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - exercised only on a broken install
    sys.exit(
        "ep_kernels: torch must be installed before building this package, and the build "
        "must see it. Run:\n    pip install torch==2.13.0\n    pip install --no-build-isolation .\n"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_build():
    """(build the CUDA kernels?, why not). They need a CUDA build of torch and a CUDA toolkit
    with nvcc; EP_KERNELS_NO_CUDA=1 skips them (a CPU-only extension, as on a CPU torch)."""
    if os.environ.get("EP_KERNELS_NO_CUDA", "") == "1":
        return False, "EP_KERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "no CUDA toolkit found (nvcc; set CUDA_HOME)"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc in {CUDA_HOME}"


def nvidia_wheel_includes():
    """Include folders of torch's own nvidia-* wheels (cuBLAS, cuSPARSE, cuDNN, ... headers that
    torch's CUDA headers include): a CUDA toolkit installed with nvcc and the runtime only lacks
    them. They go after the toolkit's own folders, so a full toolkit's headers win."""
    dirs = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return dirs
    for root in list(getattr(nvidia, "__path__", [])):
        dirs += sorted(d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))
    return dirs


WITH_CUDA, CUDA_REASON = cuda_build()


def write_build_info():
    path = os.path.join(HERE, "ep_kernels", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time; do not edit.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA = {torch.version.cuda!r}\n")
        f.write(f"CUDA_KERNELS = {WITH_CUDA!r}\n")


def cxx_standard():
    """The C++ standard torch's headers ask for: C++17 up to torch 2.13, C++20 from 2.14 on
    (ATen.h says which in its version check)."""
    try:
        from torch.utils.cpp_extension import include_paths

        for d in include_paths():
            header = os.path.join(d, "ATen", "ATen.h")
            if os.path.exists(header):
                with open(header) as f:
                    return "c++20" if "202002L" in f.read(4096) else "c++17"
    except Exception:  # pragma: no cover - a torch without headers fails later, and says so
        pass
    return "c++17"


def extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    std = cxx_standard()
    extra_compile = {"cxx": ["-O3", "-fopenmp", f"-std={std}"]}
    if not WITH_CUDA:
        print(f"ep_kernels: building the CPU kernels only; CUDA kernels skipped: {CUDA_REASON}")
        return [
            CppExtension(
                name="ep_kernels._C",
                sources=sources,
                include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args=extra_compile,
                extra_link_args=["-fopenmp"],
            )
        ]
    from torch.utils.cpp_extension import CUDAExtension

    print(f"ep_kernels: building the CPU and CUDA kernels: {CUDA_REASON}; "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(unset: the visible GPUs, or all)')}")
    extra_compile["nvcc"] = ["-O3", f"-std={std}"]
    return [
        CUDAExtension(
            name="ep_kernels._C",
            sources=sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=extra_compile,
            extra_link_args=["-fopenmp"],
        )
    ]


class _BuildExt(BuildExtension.with_options(use_ninja=True)):
    """BuildExtension with the nvidia wheels' include folders appended (see nvidia_wheel_includes)."""

    def build_extensions(self):
        if WITH_CUDA:
            extra = nvidia_wheel_includes()
            for ext in self.extensions:
                ext.include_dirs = list(ext.include_dirs) + [d for d in extra if d not in ext.include_dirs]
        super().build_extensions()


write_build_info()

setup(
    name="ep_kernels",
    version="0.1.0",
    description="Fused kernels and drop-in layers for Equilibrium Propagation in PyTorch",
    packages=find_packages(include=["ep_kernels", "ep_kernels.*"]) + ["ep_reference"],
    package_dir={"ep_reference": "python/ep_reference"},
    ext_modules=extensions(),
    cmdclass={"build_ext": _BuildExt},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib", "scikit-learn", "ninja"],
    # triton: the Triton kernels' tests run under its interpreter on CPU (3.6 is the GPU machines' version)
    extras_require={"test": ["pytest", "pytest-benchmark", "triton==3.6.0"]},
    entry_points={
        "console_scripts": [
            "ep-train=ep_kernels.train:main",
            "ep-gradcheck=ep_kernels.gradcheck:main",
        ]
    },
    zip_safe=False,
)
