"""Portable numerics: which variables the package sets before torch and numba load, and that they
reach both libraries (checked in fresh interpreters, since each reads them once, at load)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rcekd.numerics import (
    PORTABLE_SETTINGS,
    REQUIRED_FLAGS,
    NumericsError,
    cpu_flags,
    cpuinfo_field,
    numerics_settings,
    pin_numerics,
)

AVX2_HOST = REQUIRED_FLAGS | {"sse4_2", "avx512f"}


def test_portable_is_the_default_and_pins_torch_and_numba() -> None:
    assert numerics_settings({}, AVX2_HOST) == PORTABLE_SETTINGS
    assert numerics_settings({"RCEKD_NUMERICS": " Portable "}, AVX2_HOST) == PORTABLE_SETTINGS
    assert PORTABLE_SETTINGS["ATEN_CPU_CAPABILITY"] == "avx2" and PORTABLE_SETTINGS["NUMBA_CPU_NAME"] == "znver3"


def test_the_environment_wins_over_each_pinned_variable() -> None:
    settings = numerics_settings({"ATEN_CPU_CAPABILITY": "avx512"}, AVX2_HOST)
    assert "ATEN_CPU_CAPABILITY" not in settings and settings["NUMBA_CPU_NAME"] == "znver3"


def test_native_mode_and_hosts_without_avx2_pin_nothing() -> None:
    assert numerics_settings({"RCEKD_NUMERICS": "native"}, AVX2_HOST) == {}
    assert numerics_settings({}, AVX2_HOST - {"avx2"}) == {}
    assert numerics_settings({}, frozenset()) == {}  # flags unreadable: the host's own numerics


def test_an_unknown_mode_is_a_clear_error() -> None:
    with pytest.raises(NumericsError, match="portable, native"):
        numerics_settings({"RCEKD_NUMERICS": "fast"}, AVX2_HOST)


def test_pin_numerics_updates_the_given_environment_only_where_unset() -> None:
    environ = {"NUMBA_CPU_NAME": "haswell"}
    assert pin_numerics(environ, AVX2_HOST) == {k: v for k, v in PORTABLE_SETTINGS.items() if k != "NUMBA_CPU_NAME"}
    assert environ["NUMBA_CPU_NAME"] == "haswell" and environ["ATEN_CPU_CAPABILITY"] == "avx2"


def test_cpu_flags_come_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx avx2 fma\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx", "avx2", "fma"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def _record_in_fresh_interpreter(mode: str) -> dict[str, str]:
    code = "import rcekd, json; from rcekd.platform_record import platform_record; print(json.dumps(platform_record()))"
    env = {key: value for key, value in os.environ.items() if key not in PORTABLE_SETTINGS}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**env, "RCEKD_NUMERICS": mode}, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not cpu_flags() >= REQUIRED_FLAGS, reason="the host lacks AVX2: nothing is pinned")
def test_importing_rcekd_first_pins_what_torch_and_numba_use() -> None:
    portable = _record_in_fresh_interpreter("portable")
    assert portable["torch_cpu_capability"] == "AVX2"
    assert portable["numba_target"] == "znver3"
    assert portable["numba_features"] == PORTABLE_SETTINGS["NUMBA_CPU_FEATURES"]
    native = _record_in_fresh_interpreter("native")
    assert native["numba_features"] == "host"
    assert native["numba_target"] not in ("", "generic")


@pytest.mark.skipif(not cpu_flags() >= REQUIRED_FLAGS, reason="the host lacks AVX2: nothing is pinned")
def test_numba_loaded_before_rcekd_is_reported_not_hidden() -> None:
    env = {key: value for key, value in os.environ.items() if key not in PORTABLE_SETTINGS}
    done = subprocess.run(
        [sys.executable, "-c", "import numba; import rcekd"],
        env={**env, "RCEKD_NUMERICS": "portable"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "numba was imported before rcekd" in done.stderr


def test_cpuinfo_field_reads_the_first_value(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: First CPU\nflags\t: avx\nmodel name\t: Second CPU\n")
    assert cpuinfo_field("model name", cpuinfo) == "First CPU"
    assert cpuinfo_field("microcode", cpuinfo) is None
    assert cpuinfo_field("model name", tmp_path / "missing") is None


def test_platform_record_names_the_vendor_and_mkl_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from rcekd.platform_record import mkl_settings, platform_record

    monkeypatch.delenv("MKL_CBWR", raising=False)
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert mkl_settings() == "auto"
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert mkl_settings() == "MKL_CBWR=COMPATIBLE"
    record = platform_record()
    assert record["mkl"] == "MKL_CBWR=COMPATIBLE"
    assert record["cpu_vendor"] == (cpuinfo_field("vendor_id") or "unknown")
