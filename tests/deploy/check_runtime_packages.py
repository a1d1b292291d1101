#!/usr/bin/env python3
"""Checks that a Dockerfile's runtime stage installs every shared library the
Switchyard binaries link, without building or pulling the image.

The binaries' needs come from `ldd` on this machine (a Debian 12 build of the
same sources) and `dpkg -S` (library -> package). What the runtime stage
provides is the closure of the packages its `apt-get install` names, under
Debian 12's dependencies (`apt-cache depends --recurse`). Ubuntu 24.04 names
(Dockerfile.gpu) map to Debian 12 names by dropping the `t64` suffix (the
64-bit time_t rebuilds of the same upstream versions: grpc 1.51, protobuf
3.21, abseil 20220623). Libraries that no package owns must be CUDA runtime
libraries, and only when --cuda-base says the base image ships them (the
nvidia/cuda *-runtime images carry libcudart and the cuBLAS libraries).

Exit status 0 when every library is covered; 1 with one line per missing
library (binary, library, the package that provides it here) otherwise.
"""
import argparse
import os
import re
import subprocess
import sys

# Libraries the nvidia/cuda:*-runtime-* images ship (their "runtime" flavour:
# cudart, cuBLAS, and the other math libraries).
CUDA_RUNTIME_LIBS = re.compile(
    r"^lib(cudart|cublas|cublasLt|cufft|curand|cusolver|cusparse|nvrtc|nvJitLink|npp\w*|nvjpeg)"
    r"\.so(\.\d+)*$")


def runtime_stage_packages(dockerfile):
    """The packages named by `apt-get install` in the last stage of DOCKERFILE."""
    text = open(dockerfile, encoding="utf-8").read()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    lines = [l for l in text.splitlines() if not l.lstrip().startswith("#")]
    stage_start = max(i for i, l in enumerate(lines) if re.match(r"\s*FROM\s", l, re.I))
    packages = []
    for line in lines[stage_start:]:
        if not re.match(r"\s*RUN\s", line, re.I):
            continue
        for command in re.split(r"&&|;|\|\|", line):
            words = command.split()
            if "apt-get" not in words or "install" not in words:
                continue
            args = words[words.index("install") + 1:]
            packages += [w for w in args if not w.startswith("-")]
    return packages


# Ubuntu 24.04 packages whose upstream version (so soname and package name)
# differs from Debian 12's, mapped to the Debian 12 package of the same library.
UBUNTU_2404_LIBRARIES = {
    "libcpp-httplib0.14t64": "libcpp-httplib0.11",  # cpp-httplib 0.14.3 there, 0.11.4 here
}


def debian_name(package):
    """Debian 12's name for a runtime-stage package (Ubuntu's t64 names mapped)."""
    if package in UBUNTU_2404_LIBRARIES:
        return UBUNTU_2404_LIBRARIES[package]
    if package.endswith("t64") and not known_package(package):
        return package[:-3]
    return package


def known_package(package):
    out = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                         capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() != ""


def dependency_closure(packages):
    """PACKAGES and everything they (pre-)depend on, recursively, in Debian 12."""
    out = subprocess.run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances"] + packages,
        capture_output=True, text=True, check=True).stdout
    closure = set()
    for line in out.splitlines():
        if line and not line[0].isspace() and not line.startswith("<"):
            closure.add(line.strip().split(":")[0])
    return closure


def owners(paths):
    """{path: the Debian package that installed it} for PATHS that some package owns.

    One `dpkg -S` for all of them (each call reads the whole database); each
    path is also tried as its /usr-merged alias and its symlink target.
    """
    aliases = {}
    for path in paths:
        for p in {path, os.path.realpath(path)}:
            aliases.setdefault(p, set()).add(path)
            if p.startswith("/usr/lib/"):
                aliases.setdefault(p[len("/usr"):], set()).add(path)
            elif p.startswith("/lib/"):
                aliases.setdefault("/usr" + p, set()).add(path)
    out = subprocess.run(["dpkg", "-S"] + sorted(aliases), capture_output=True, text=True)
    found = {}
    for line in out.stdout.splitlines():
        package, _, owned = line.partition(": ")
        for path in aliases.get(owned.strip(), ()):
            found.setdefault(path, package.split(",")[0].split(":")[0].strip())
    return found


def linked_libraries(binary):
    """(soname, resolved path or None) for every library `ldd BINARY` lists."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"ldd {binary} failed: {out.stderr.strip() or out.stdout.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        m = re.match(r"\s*(\S+) => (not found|(\S+) \(0x[0-9a-f]+\))", line)
        if m:
            libs.append((m.group(1), m.group(3)))
    return libs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dockerfile", required=True)
    parser.add_argument("--cuda-base", action="store_true",
                        help="the runtime stage's base image ships the CUDA runtime libraries")
    parser.add_argument("--image-without-cuda", action="store_true",
                        help="the image's binaries are built without the CUDA backend (the CPU "
                             "image: -DSWITCHYARD_CUDA=OFF), so CUDA libraries linked by these "
                             "binaries are not its concern")
    parser.add_argument("binaries", nargs="+")
    args = parser.parse_args()

    listed = runtime_stage_packages(args.dockerfile)
    if not listed:
        sys.exit(f"{args.dockerfile}: no `apt-get install` in the runtime stage")
    unknown = [p for p in listed if not known_package(debian_name(p))]
    if unknown:
        sys.exit(f"{args.dockerfile}: no Debian 12 package for {' '.join(unknown)}")
    provided = dependency_closure([debian_name(p) for p in listed])
    print(f"{args.dockerfile}: runtime stage installs {' '.join(listed)} "
          f"({len(provided)} packages with their dependencies)")

    links = [(binary, soname, path) for binary in args.binaries
             for soname, path in linked_libraries(binary)]
    owner = owners({path for _, _, path in links if path})
    missing, cuda_libs = [], set()
    for binary, soname, path in links:
        if path is None:
            missing.append(f"{binary}: {soname} is not found here (ldd)")
            continue
        package = owner.get(path)
        if package is None:
            if (args.cuda_base or args.image_without_cuda) and CUDA_RUNTIME_LIBS.match(soname):
                cuda_libs.add(soname)
                continue
            missing.append(f"{binary}: {soname} ({path}) belongs to no Debian package "
                           "and is not a CUDA runtime library the base image ships")
        elif package not in provided:
            missing.append(f"{binary}: {soname} needs package {package}, which the runtime "
                           "stage neither installs nor gets as a dependency")
    checked = len(links)
    print(f"checked {checked} library links of {len(args.binaries)} binaries"
          + (f"; {'not in this image (built without CUDA)' if args.image_without_cuda else 'from the CUDA base image'}: "
             f"{' '.join(sorted(cuda_libs))}" if cuda_libs else ""))
    if missing:
        print(f"{args.dockerfile}: MISSING runtime libraries:")
        for m in sorted(set(missing)):
            print(f"  {m}")
        return 1
    print(f"{args.dockerfile}: every linked library is provided")
    return 0


if __name__ == "__main__":
    sys.exit(main())
