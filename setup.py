"""Build the compiled MoE core `flanmoe_nb._C` from cpp/.

C++ sources (cpp/*.cpp) are always compiled with OpenMP and -O3. CUDA sources (cpp/cuda/*.cu) are
compiled as a CUDAExtension only when the installed torch was built with CUDA and nvcc is found.
Set FLANMOE_NO_CUDA=1 to force a CPU-only build, FLANMOE_DEBUG=1 for -O0 -g, FLANMOE_NATIVE=1 for -march=native.
"""
import glob, json, os
from pathlib import Path

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = Path(__file__).parent
debug = os.environ.get("FLANMOE_DEBUG", "0") == "1"
use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
            and os.environ.get("FLANMOE_NO_CUDA", "0") != "1")

cpp_sources = sorted(glob.glob("cpp/*.cpp"))
cu_sources = sorted(glob.glob("cpp/cuda/*.cu")) if use_cuda else []

torch_version = torch.__version__
opt = ["-O0", "-g"] if debug else ["-O3"]
cxx_flags = opt + ["-fopenmp", "-std=c++17", f'-DFLANMOE_TORCH_VERSION="{torch_version}"']
if os.environ.get("FLANMOE_NATIVE", "0") == "1": cxx_flags.append("-march=native")
nvcc_flags = opt + ["-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", f'-DFLANMOE_TORCH_VERSION="{torch_version}"']
if use_cuda: cxx_flags.append("-DFLANMOE_WITH_CUDA")

# Written beside the package so that `flanmoe_nb.kernels` can explain a torch mismatch clearly.
(ROOT / "flanmoe_nb" / "_build_info.json").write_text(json.dumps(
    {"torch": torch_version, "cuda": torch.version.cuda if use_cuda else None}) + "\n")

Ext = CUDAExtension if use_cuda else CppExtension
ext = Ext(
    name="flanmoe_nb._C",
    sources=cpp_sources + cu_sources,
    include_dirs=[str(ROOT / "cpp")],
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if use_cuda else {"cxx": cxx_flags},
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
