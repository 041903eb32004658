"""The CUDA sources compile: every cpp/cuda/*.cu to an sm_80 object with nvcc, also where torch is a CPU build
(the check a machine without a GPU can make). A CPU wheel lacks one generated header of c10/cuda; a stub of it
goes into a temporary include directory. The tensor-core kernels must not spill registers."""
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "cpp" / "cuda").glob("*.cu"))


def _nvcc():
    exe = shutil.which("nvcc")
    if exe is None and cpp_extension.CUDA_HOME:
        cand = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
        exe = str(cand) if cand.exists() else None
    return exe


def _spills(ptxas_log: str, kernel: str) -> list[str]:
    "The 'N bytes spill' lines of ptxas -v for the entry functions whose mangled name contains `kernel`."
    bad, current = [], None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m: current = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current and kernel in current and (int(m.group(1)) or int(m.group(2))):
            bad.append(f"{current}: {line.strip()}")
    return bad


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (not on PATH, no CUDA_HOME/bin/nvcc)")
@pytest.mark.parametrize("src", SOURCES, ids=[p.name for p in SOURCES])
def test_cuda_source_compiles_for_sm80(src, tmp_path):
    torch_inc = cpp_extension.include_paths()                    # torch/include, torch/csrc/api/include
    incs = []
    if not any((Path(d) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for d in torch_inc):
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"        # CPU wheel: the header CMake writes for CUDA builds
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs.append(tmp_path / "stub")
    incs += [*torch_inc, sysconfig.get_paths()["include"], ROOT / "cpp"]
    cmd = [_nvcc(), "-c", "-std=c++17", "-O3", "-arch=sm_80", "-Xptxas", "-v", *cpp_extension.COMMON_NVCC_FLAGS,
           "-DFLANMOE_WITH_CUDA", *(f"-I{d}" for d in incs), str(src), "-o", str(tmp_path / (src.stem + ".o"))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"nvcc failed ({r.returncode}):\n{' '.join(map(str, cmd))}\n{r.stderr[-20000:]}"
    assert (tmp_path / (src.stem + ".o")).stat().st_size > 0
    assert not _spills(r.stderr + r.stdout, "tc_gemm_kernel"), "\n".join(_spills(r.stderr + r.stdout, "tc_gemm_kernel"))
