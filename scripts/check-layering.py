#!/usr/bin/env python3
"""Checks that the top-level folders depend one way (README "Layout").

Every `#include "FOLDER/..."` in a source file must point at the file's own
folder or at a folder on a lower level of the plan below; siblings on one
level (attention_service/expert_service, rpc/metrics) do not include each
other. CMake files may not compile another folder's sources by path.
bench/, fuzz/ and tests/ sit on top and may include anything.

usage: check-layering.py [REPO_ROOT]   (exit 1 and one line per violation)
"""
import os
import re
import sys

# Level of each folder; a folder may include only its own and lower levels.
LEVELS = {
    "core": 0,
    "protos": 1,     # generated "switchyard/v1/*.pb.h", "grpc/health/v1/*"
    "rpc": 2,
    "metrics": 2,
    "cuda": 3,
    "attention_service": 4,
    "expert_service": 4,
    "gateway": 5,
    "cli": 6,
}
TOP = {"bench", "fuzz", "tests"}
# Include prefixes that name a folder of ours under another name.
ALIASES = {"switchyard/v1": "protos", "grpc/health/v1": "protos",
           "grpc/reflection/v1": "protos"}
SOURCE_EXT = (".h", ".cc", ".cu", ".cuh", ".in")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def target_folder(path):
    for prefix, folder in ALIASES.items():
        if path.startswith(prefix + "/"):
            return folder
    head = path.split("/", 1)[0]
    if head in LEVELS or head in TOP:
        return head
    return None  # a third-party header (absl/, gtest/, ...)


def main():
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                           os.path.join(os.path.dirname(__file__), ".."))
    errors = []
    for folder in sorted(LEVELS):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                if name.endswith(SOURCE_EXT):
                    with open(path, encoding="utf-8", errors="replace") as f:
                        for lineno, line in enumerate(f, 1):
                            m = INCLUDE.match(line)
                            if not m:
                                continue
                            to = target_folder(m.group(1))
                            if to is None or to == folder:
                                continue
                            if to in TOP or LEVELS[to] >= LEVELS[folder]:
                                errors.append(f"{rel}:{lineno}: {folder}/ (level {LEVELS[folder]}) "
                                              f"includes {m.group(1)} from {to}/ (level "
                                              f"{LEVELS.get(to, 'top')}): includes must point down")
                if name == "CMakeLists.txt" or name.endswith(".cmake"):
                    with open(path, encoding="utf-8") as f:
                        for lineno, line in enumerate(f, 1):
                            code = line.split("#", 1)[0]
                            for m in re.finditer(r"\$\{PROJECT_SOURCE_DIR\}/(\w+)/[\w/]+\.(cc|cu)\b",
                                                 code):
                                if m.group(1) != folder:
                                    errors.append(f"{rel}:{lineno}: compiles {m.group(0)} of another "
                                                  f"folder; link that folder's library instead")
    for e in errors:
        print(e)
    if errors:
        print(f"check-layering: {len(errors)} violation(s)")
        return 1
    print(f"check-layering: includes point down in {', '.join(sorted(LEVELS))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
