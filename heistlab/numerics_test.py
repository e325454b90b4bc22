"""The numerics digest tells machines apart by how they compute, not by what they are called."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from heistlab import numerics


def test_the_cpu_description_reads_the_model_and_the_vector_extensions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f ht\n"
        "processor\t: 1\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f ht\n"
    )
    found = numerics.cpu_description(cpuinfo)
    assert found["cpu"] == "Example CPU 9000"
    assert found["vector_flags"] == ["sse4_2", "avx", "avx2", "fma", "avx512f"]


def test_a_machine_is_described_in_one_line():
    line = numerics.describe(
        {"numerics": "0123", "cpu": "Example CPU", "vector_flags": ["avx2"], "cores": 2, "jax": "1.0",
         "backend": "cpu"}
    )  # fmt: skip
    assert line == "Example CPU (avx2), 2 cores, JAX 1.0 on cpu, numerics 0123"


def digest_limited_to(isa: str) -> str:
    environment = {**os.environ, "XLA_FLAGS": f"--xla_cpu_max_isa={isa}", "JAX_PLATFORMS": "cpu"}
    program = "from heistlab import numerics; print(numerics.probe_digest())"
    done = subprocess.run(
        [sys.executable, "-c", program], env=environment, capture_output=True, text=True, check=True
    )
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.skipif(
    platform.machine() != "x86_64" or "avx2" not in numerics.cpu_description()["vector_flags"],
    reason="needs an x86-64 CPU with AVX2, to compare its kernels with SSE4.2's",
)
def test_the_digest_is_stable_and_changes_with_the_kernels_xla_generates():
    here = numerics.probe_digest()
    assert numerics.probe_digest() == here
    assert digest_limited_to("SSE4_2") != here
