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


def write_build_info():
    path = os.path.join(HERE, "ep_kernels", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time; do not edit.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA = {torch.version.cuda!r}\n")


def extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    extra_compile = {"cxx": ["-O3", "-fopenmp", "-std=c++17"]}
    return [
        CppExtension(
            name="ep_kernels._C",
            sources=sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=extra_compile,
            extra_link_args=["-fopenmp"],
        )
    ]


write_build_info()

setup(
    name="ep_kernels",
    version="0.1.0",
    description="Fused kernels and drop-in layers for Equilibrium Propagation in PyTorch",
    packages=find_packages(include=["ep_kernels", "ep_kernels.*"]) + ["ep_reference"],
    package_dir={"ep_reference": "python/ep_reference"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib", "scikit-learn", "ninja"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={
        "console_scripts": [
            "ep-train=ep_kernels.train:main",
            "ep-gradcheck=ep_kernels.gradcheck:main",
        ]
    },
    zip_safe=False,
)
