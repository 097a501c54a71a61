"""Run a command as on a CPU whose AMX tiles Linux refuses: a seccomp filter fails the request
for AMX's tile state (arch_prctl ARCH_REQ_XCOMP_PERM) with EPERM in the command and every
process it starts, so oneDNN, onnxruntime's MLAS and the compiled int8 kernel each take their
AVX-512 path, as on a Zen 4, Ice Lake or Cascade Lake (and as on an AMX Xeon under a kernel or
container that withholds the tiles). The CPU's flags still list `amx_*`; the service asks Linux
as well (cpu_features.amx_tiles_granted).

    python -m perf.without_amx python -m perf.bench_first_pass_precision --batches 1,8

Held this way a benchmark still runs every other instruction of the CPU it is on (AVX-512 FP16
on a Sapphire Rapids, say): ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 in its environment holds oneDNN
to Zen 4's instructions as well, and a CC wrapper adding -mno-amx-tile -mno-amx-int8
-mno-amx-bf16 the compiled kernels' build.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

from twopass_asr.kernels.cpu_features import ARCH_REQ_XCOMP_PERM, SYS_ARCH_PRCTL

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
EPERM = 1
# Classic BPF opcodes and the offsets of struct seccomp_data's fields.
LOAD_WORD = 0x20  # BPF_LD | BPF_W | BPF_ABS
JUMP_IF_EQUAL = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
RETURN = 0x06  # BPF_RET | BPF_K
SYSCALL_NUMBER, ARCHITECTURE, FIRST_ARGUMENT = 0, 4, 16


def _instruction(code: int, jump_true: int, jump_false: int, value: int) -> bytes:
    return struct.pack("=HBBI", code, jump_true, jump_false, value)


def refuse_amx_tiles() -> None:
    """From now on this process and its children are refused AMX's tile state. Raises OSError
    where Linux will not take the filter, RuntimeError off x86-64 Linux."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise RuntimeError("refusing AMX's tiles needs x86-64 Linux")
    program = b"".join(
        (
            _instruction(LOAD_WORD, 0, 0, ARCHITECTURE),
            _instruction(JUMP_IF_EQUAL, 1, 0, AUDIT_ARCH_X86_64),
            _instruction(RETURN, 0, 0, SECCOMP_RET_ALLOW),
            _instruction(LOAD_WORD, 0, 0, SYSCALL_NUMBER),
            _instruction(JUMP_IF_EQUAL, 0, 3, SYS_ARCH_PRCTL),
            _instruction(LOAD_WORD, 0, 0, FIRST_ARGUMENT),
            _instruction(JUMP_IF_EQUAL, 0, 1, ARCH_REQ_XCOMP_PERM),
            _instruction(RETURN, 0, 0, SECCOMP_RET_ERRNO | EPERM),
            _instruction(RETURN, 0, 0, SECCOMP_RET_ALLOW),
        )
    )
    filter_buffer = ctypes.create_string_buffer(program, len(program))

    class FilterProgram(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ushort), ("instructions", ctypes.c_void_p)]

    prog = FilterProgram(len(program) // 8, ctypes.addressof(filter_buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    for option, argument, pointer in (
        (PR_SET_NO_NEW_PRIVS, 1, None),
        (PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog)),
    ):
        if libc.prctl(option, argument, pointer, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl({option}): {os.strerror(error)}")


def main(argv: list[str] | None = None) -> None:
    command = sys.argv[1:] if argv is None else argv
    if not command:
        sys.exit("usage: python -m perf.without_amx COMMAND [ARGUMENT...]")
    refuse_amx_tiles()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
