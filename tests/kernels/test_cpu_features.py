"""The CPU flags that decide precisions, and the summary every benchmark prints."""

from __future__ import annotations

from twopass_asr.kernels import cpu_features
from twopass_asr.kernels.cpu_features import (
    cpu_flags,
    cpu_has_amx_int8,
    cpu_has_int8_dot_products,
    cpu_has_native_bf16,
    cpu_summary,
)


def test_flags_and_summary_come_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU\nflags\t\t: fpu avx2 avx512f avx512_vnni\n\n"
                       "processor\t: 1\nmodel name\t: Example CPU\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512f", "avx512_vnni"}
    assert cpu_summary(cpuinfo).startswith("Example CPU, ")
    assert cpu_summary(cpuinfo).endswith("cores: avx2 avx512f avx512_vnni")


def test_an_unreadable_cpuinfo_is_unknown_not_an_error(tmp_path):
    assert cpu_flags(tmp_path / "missing") is None
    assert cpu_summary(tmp_path / "missing").startswith("unknown CPU, ")
    arm = tmp_path / "arm"
    arm.write_text("Features\t: fp asimd bf16 i8mm\n")
    assert cpu_flags(arm) == {"fp", "asimd", "bf16", "i8mm"}
    assert "none of avx2" in cpu_summary(arm)


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert not cpu_has_native_bf16(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_native_bf16(cpuinfo)
    cpuinfo.write_text("Features\t: fp asimd sve bf16 i8mm\n")
    assert cpu_has_native_bf16(cpuinfo)
    assert not cpu_has_native_bf16(tmp_path / "missing")  # unknown: the exact float32 path


def test_int8_dot_products_are_read_from_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert cpu_has_int8_dot_products(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2 amx_int8 amx_tile\n")
    assert cpu_has_int8_dot_products(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2 avx_vnni\n")  # AVX-VNNI alone: not measured yet
    assert not cpu_has_int8_dot_products(cpuinfo)
    assert not cpu_has_int8_dot_products(tmp_path / "missing")


def test_amx_int8_is_read_from_the_cpu_flags_and_needs_linuxs_grant(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_features, "amx_tiles_granted", lambda: True)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n")  # Zen 4, Ice Lake: VNNI alone
    assert not cpu_has_amx_int8(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512_vnni amx_bf16 amx_tile amx_int8\n")
    assert cpu_has_amx_int8(cpuinfo)
    assert not cpu_has_amx_int8(tmp_path / "missing")
    monkeypatch.setattr(cpu_features, "amx_tiles_granted", lambda: False)  # an old kernel, a seccomp filter
    assert not cpu_has_amx_int8(cpuinfo)
