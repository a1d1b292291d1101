#!/usr/bin/env python3
"""Turns a CUDA source (cuda/kernels/*.cu) into C++ for the CPU emulator
(cuda/emulator/device_emulation.h): every launch

    Kernel<<<grid, block, shared_bytes, stream>>>(args...)

becomes

    ::switchyard::emulator::Launch(grid, block, shared_bytes, stream, BARRIERS, Kernel, args...)

where BARRIERS says whether the file synchronises threads (__syncthreads,
warp shuffles or the kernel_util.cuh helpers built on them): kernels that do
not run each thread as a plain call, the others as fibers. Nothing else
changes, so the emulated kernels are the kernels of the build.

usage: cu_to_cc.py IN.cu OUT.cc
"""
import re
import sys


def split_top_level(text):
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        if ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def main():
    src = open(sys.argv[1]).read()
    barriers = bool(re.search(r"__syncthreads|__shfl|WarpSum|BlockSum", src))
    launch = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\(\s*(\)?)", re.S)

    def rewrite(m):
        config = split_top_level(m.group(2))
        if len(config) == 2:
            config += ["0", "nullptr"]
        elif len(config) == 3:
            config += ["nullptr"]
        if len(config) != 4:
            sys.exit(f"{sys.argv[1]}: cannot read the launch configuration <<<{m.group(2)}>>>")
        head = (f"::switchyard::emulator::Launch({config[0]}, {config[1]}, {config[2]}, {config[3]}, "
                f"{'true' if barriers else 'false'}, {m.group(1)}")
        return head + (")" if m.group(3) else ", ")

    out, n = launch.subn(rewrite, src)
    if n == 0:
        sys.exit(f"{sys.argv[1]}: no kernel launch found")
    with open(sys.argv[2], "w") as f:
        f.write(f'// Generated from {sys.argv[1]} by cuda/emulator/cu_to_cc.py: do not edit.\n')
        f.write('#include "cuda/emulator/device_emulation.h"\n')
        f.write(f'#line 1 "{sys.argv[1]}"\n')
        f.write(out)


if __name__ == "__main__":
    main()
