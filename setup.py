"""Build the compiled MoE core `flanmoe_nb._C` from cpp/.

C++ sources (cpp/*.cpp) are always compiled with OpenMP and -O3. CUDA sources (cpp/cuda/*.cu) are
compiled as a CUDAExtension only when the installed torch was built with CUDA and nvcc is found.
Set FLANMOE_NO_CUDA=1 to force a CPU-only build, FLANMOE_DEBUG=1 for -O0 -g, FLANMOE_NATIVE=1 for -march=native.
"""
import glob, hashlib, json, os, subprocess
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
INFO = ROOT / "flanmoe_nb" / "_build_info.json"
build_info = {"torch": torch_version, "cuda": torch.version.cuda if use_cuda else None}
INFO.write_text(json.dumps(build_info) + "\n")


def source_hash() -> str:
    "What the compiled code depends on: every cpp/ source, the flags, the compiler and torch (not the build's time)."
    h = hashlib.sha256()
    for f in sorted(p for p in (ROOT / "cpp").rglob("*") if p.is_file()):
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    cxx = os.environ.get("CXX", "c++")
    try: compiler = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError): compiler = cxx
    h.update(json.dumps([cxx_flags, nvcc_flags, compiler, torch_version, use_cuda]).encode())
    return h.hexdigest()[:20]


class Build(BuildExtension.with_options(use_ninja=True)):
    """build_ext that records the sources' hash once the extension is built: kernel choices cached per machine survive a
    rebuild of the same code (`extension.machine_fingerprint`), and are measured again when the code changes."""
    def run(self):
        super().run()
        INFO.write_text(json.dumps(dict(build_info, sources=source_hash())) + "\n")

Ext = CUDAExtension if use_cuda else CppExtension
ext = Ext(
    name="flanmoe_nb._C",
    sources=cpp_sources + cu_sources,
    include_dirs=[str(ROOT / "cpp")],
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if use_cuda else {"cxx": cxx_flags},
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": Build})
