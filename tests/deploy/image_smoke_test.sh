#!/usr/bin/env bash
# Builds deploy/Dockerfile.cpu with podman and runs the image as a user would.
#
# Usage: image_smoke_test.sh BUILD_DIR SOURCE_DIR
#
# 1. A base image without a registry: `debootstrap --variant=minbase bookworm`
#    from this machine's Debian mirror, with this machine's Debian apt sources,
#    imported as debian:12 and debian:12-slim. The root filesystem tarball and
#    the image store (podman's layer cache) live in BUILD_DIR/image-test, so a
#    second run reuses both.
# 2. `podman build --layers` of deploy/Dockerfile.cpu. By default its
#    runtime stage takes the binaries this host's build made (BUILD_DIR/bin,
#    stripped, imported as an image and passed as SWITCHYARD_BINARIES): the
#    host is Debian 12 with the same compiler and libraries, and the builder
#    stage would only repeat scripts/install-deps.sh + scripts/build.sh, which
#    CI has just run on a fresh machine (that repeat was ~6 of CI's minutes).
#    SWITCHYARD_IMAGE_TEST_FULL_BUILD=1 builds the builder stage as
#    `docker build` does (it compiles with SWITCHYARD_JOBS jobs, default nproc).
# 3. In the image: `--help` of every binary in /usr/local/bin (exit 0, a
#    `usage:` line on stdout, any case), `ldd` of every binary (no `not found`).
# 4. The default command in a container with a read-only root filesystem (and
#    a tmpfs on /tmp, as the Kubernetes manifests give it), all capabilities
#    dropped, as the image's user: a generation through the published gateway
#    port with the host's build/bin/switchyard client must give the same tokens
#    as the same greedy request run in-process on the host.
# 5. `podman stop` (SIGTERM, 30 s grace): the container exits with status 0
#    before the grace period ends.
#
# Exit 77 (ctest SKIP_RETURN_CODE) only where podman cannot run containers at
# all here: not root (the test uses rootful podman and debootstrap), or no
# namespaces can be created. A missing tool is a failure: scripts/install-deps.sh
# installs them.
#
# Environment: SWITCHYARD_IMAGE_TEST_FULL_BUILD=1 (build the builder stage too),
# SWITCHYARD_JOBS (its compile jobs), SWITCHYARD_IMAGE_TEST_KEEP=1
# (leave the test container behind for inspection).
set -euo pipefail

build_dir=$(realpath "${1:?usage: image_smoke_test.sh BUILD_DIR SOURCE_DIR}")
source_dir=$(realpath "${2:?usage: image_smoke_test.sh BUILD_DIR SOURCE_DIR}")
client="$build_dir/bin/switchyard"
model="$source_dir/tests/data/tiny-mixtral"
state="$build_dir/image-test"
image=localhost/switchyard:cpu-test
container=switchyard-image-test-$$
t0=$SECONDS

say() { echo "[image-test +$((SECONDS - t0))s] $*"; }
fail() {
  echo "FAIL: $*" >&2
  exit 1
}
skip() {
  echo "SKIP: $*"
  exit 77
}

# --- can podman run here at all? ----------------------------------------------
[ "$(id -u)" -eq 0 ] || skip "needs root (rootful podman, debootstrap); run as root"
if ! unshare --mount --pid --net --uts --ipc --fork true 2>/dev/null; then
  skip "cannot create namespaces here (unshare --mount --pid --net --uts --ipc failed)"
fi
for tool in podman runc debootstrap ldd python3; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (scripts/install-deps.sh)"
done
[ -x "$client" ] || fail "$client is missing (build the switchyard target)"

# --- podman configuration, private to this test --------------------------------
# runc: Debian 12's podman prefers crun, which install-deps.sh does not install. cgroupfs:
# there may be no systemd. Ulimits: podman's default nofile (1048576) is above
# this machine's hard limit, and podman caps its own nproc at 32768; a
# container asking for more than either fails with "error setting rlimit".
mkdir -p "$state"
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
[ "$nofile" -gt 1048576 ] && nofile=1048576
nproc=$(ulimit -Hu)
[ "$nproc" = unlimited ] && nproc=32768
[ "$nproc" -gt 32768 ] && nproc=32768
cat >"$state/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
# overlay keeps the builder's layers (about 2 GB) shared instead of copied.
cat >"$state/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$state/storage"
runroot = "$state/run"
EOF
export CONTAINERS_CONF="$state/containers.conf"
export CONTAINERS_STORAGE_CONF="$state/storage.conf"

cleanup() {
  if [ "${SWITCHYARD_IMAGE_TEST_KEEP:-0}" != 1 ]; then
    podman rm -f -t 0 "$container" >/dev/null 2>&1 || true
  fi
  # containers/storage leaves its overlay directory bind-mounted; unmount it
  # so that the build tree can be deleted (it is mounted again when needed).
  if [ -z "$(podman ps -q 2>/dev/null)" ]; then
    umount "$state/storage/overlay" 2>/dev/null || true
  fi
}
trap cleanup EXIT

if ! podman info >/dev/null 2>"$state/podman-info.err"; then
  cat "$state/podman-info.err" >&2
  fail "podman info failed"
fi

# --- base image: debootstrap, cached ------------------------------------------
# The Debian mirror this machine's apt uses (deb822 .sources or one-line
# sources.list), the first that offers bookworm.
debian_mirror() {
  python3 - <<'PY'
import glob, re
for f in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(f).read()):
        fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M))
        if "bookworm" in fields.get("Suites", "").split() and fields.get("URIs"):
            print(fields["URIs"].split()[0]); raise SystemExit
for f in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try: lines = open(f).read().splitlines()
    except OSError: continue
    for line in lines:
        words = re.sub(r"\[[^]]*\]", "", line).split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
            print(words[1]); raise SystemExit
PY
}
rootfs_tar="$state/debian-12-minbase.tar"
if ! podman image exists localhost/debian:12 || ! podman image exists localhost/debian:12-slim; then
  if [ ! -s "$rootfs_tar" ]; then
    mirror=$(debian_mirror | head -n1)
    [ -n "$mirror" ] || fail "no apt source offers bookworm in /etc/apt/sources.list*"
    say "debootstrap --variant=minbase bookworm from $mirror"
    rootfs="$state/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$state/debootstrap.log" 2>&1 ||
      {
        tail -n 20 "$state/debootstrap.log" >&2
        fail "debootstrap failed (log: $state/debootstrap.log)"
      }
    # The machine's Debian apt sources (same mirror, also updates and security),
    # so that the image's apt sees what this machine's apt sees.
    rm -f "$rootfs"/etc/apt/sources.list "$rootfs"/etc/apt/sources.list.d/*
    copied=0
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list; do
      [ -f "$f" ] || continue
      # Only the sources signed by Debian's keyring or naming bookworm without
      # another keyring (third-party sources need keys the image lacks).
      if grep -q 'debian-archive-keyring' "$f" ||
        { grep -qE '(^|[[:space:]])bookworm([[:space:]]|$)' "$f" && ! grep -q 'Signed-By\|signed-by' "$f"; }; then
        cp "$f" "$rootfs/etc/apt/${f#/etc/apt/}"
        copied=1
      fi
    done
    [ "$copied" = 1 ] || echo "deb $mirror bookworm main" >"$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" --numeric-owner -cf "$rootfs_tar.tmp" .
    mv "$rootfs_tar.tmp" "$rootfs_tar"
    rm -rf "$rootfs"
  fi
  say "podman import as debian:12, debian:12-slim"
  podman import --quiet "$rootfs_tar" localhost/debian:12 >/dev/null
  podman tag localhost/debian:12 localhost/debian:12-slim
fi

# --- can it run a container? --------------------------------------------------
if ! podman run --rm --network none localhost/debian:12 true 2>"$state/run.err"; then
  cat "$state/run.err" >&2
  if grep -qiE 'user namespace|newuidmap|operation not permitted.*(unshare|clone)' "$state/run.err"; then
    skip "podman cannot start a container here (see above)"
  fi
  fail "podman run of the base image failed"
fi

# --- build the image ----------------------------------------------------------
: >"$state/build.log"
# Working containers of a build that was interrupted (a ctest timeout).
podman ps -a --external --format '{{.ID}} {{.Command}}' | awk '$2 == "buildah" { print $1 }' |
  xargs -r podman rm -f --storage >/dev/null 2>&1 || true
jobs=${SWITCHYARD_JOBS:-$(nproc)}
if [ "${SWITCHYARD_IMAGE_TEST_FULL_BUILD:-0}" = 1 ]; then
  say "podman build deploy/Dockerfile.cpu, builder stage included (SWITCHYARD_JOBS=$jobs)"
  # The builder stage is built and tagged first: the prune below removes every
  # untagged image that nothing builds on, and the builder stage's last layer
  # is one (the runtime stage only copies from it), then the whole chain under it.
  targets=(builder "")
  binaries_arg=()
else
  # The host's binaries, stripped as the builder stage strips them, as an
  # image with only /src/build/bin (the path the runtime stage copies from).
  say "podman build deploy/Dockerfile.cpu with this host's binaries"
  prebuilt="$state/prebuilt"
  rm -rf "$prebuilt"
  mkdir -p "$prebuilt/src/build/bin"
  for b in switchyard switchyard-gateway switchyard-expert; do
    [ -x "$build_dir/bin/$b" ] || fail "$build_dir/bin/$b is missing (build it first)"
    strip --strip-debug -o "$prebuilt/src/build/bin/$b" "$build_dir/bin/$b"
  done
  tar -C "$prebuilt" --numeric-owner -cf "$prebuilt.tar" src
  podman import --quiet "$prebuilt.tar" localhost/switchyard-binaries:test >/dev/null
  rm -rf "$prebuilt" "$prebuilt.tar"
  targets=("")
  binaries_arg=(--build-arg SWITCHYARD_BINARIES=localhost/switchyard-binaries:test)
fi
for target in "${targets[@]}"; do
  if ! podman build --layers --pull=never --build-arg SWITCHYARD_JOBS="$jobs" "${binaries_arg[@]}" \
    ${target:+--target "$target"} -f "$source_dir/deploy/Dockerfile.cpu" \
    -t "$image${target:+-$target}" "$source_dir" >>"$state/build.log" 2>&1; then
    tail -n 40 "$state/build.log" >&2
    fail "podman build ${target:+--target $target }failed (log: $state/build.log)"
  fi
done
# Drop the images of earlier runs (superseded by these tags); the current
# chains stay as the layer cache of the next run.
podman image prune -f >/dev/null 2>&1 || true
say "built $image ($(podman image inspect --format '{{.Size}}' "$image" | numfmt --to=si)B)"

# --- --help and ldd of every binary -------------------------------------------
binaries=$(podman run --rm --network none "$image" sh -c 'ls /usr/local/bin')
[ -n "$binaries" ] || fail "no binaries in /usr/local/bin"
for b in switchyard switchyard-gateway switchyard-expert; do
  grep -qx "$b" <<<"$binaries" || fail "/usr/local/bin/$b is missing from the image"
done
for b in $binaries; do
  if ! out=$(podman run --rm --network none "$image" "$b" --help 2>"$state/help.err"); then
    cat "$state/help.err" >&2
    fail "$b --help exits non-zero in the image"
  fi
  grep -qi '^usage: ' <<<"$out" || fail "$b --help printed no usage line on stdout: $out"
  say "$b --help: ok"
done
# ldd of each binary: exit 0, resolves libgrpc++ (it is dynamic), nothing not found.
ldd_out=$(podman run --rm --network none "$image" sh -c \
  'for b in /usr/local/bin/*; do echo "== $b"; ldd "$b" || echo "LDD FAILED: $b"; done')
if grep -qE 'not found|LDD FAILED' <<<"$ldd_out"; then
  echo "$ldd_out" >&2
  fail "ldd in the image: missing libraries (add their packages to the runtime stage)"
fi
for b in $binaries; do
  # (No `| grep -q` under pipefail: grep's early exit would fail the writer.)
  libs=$(awk -v b="== /usr/local/bin/$b" '$0 == b { on = 1; next } /^== / { on = 0 } on' <<<"$ldd_out")
  grep -q 'libgrpc++' <<<"$libs" || fail "ldd /usr/local/bin/$b shows no libgrpc++: $ldd_out"
done
say "ldd: every library of $(wc -w <<<"$binaries") binaries found"

# --- the default command, read-only, through a published port -----------------
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
podman rm -f -t 0 "$container" >/dev/null 2>&1 || true
podman run -d --name "$container" --read-only --read-only-tmpfs=false --tmpfs /tmp \
  --cap-drop ALL --security-opt no-new-privileges \
  -p "127.0.0.1:$port:50051" "$image" >/dev/null
say "started the default command, gateway published on 127.0.0.1:$port"
[ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$container")" = true ] ||
  fail "the container's root filesystem is not read-only"
deadline=$((SECONDS + 180))
until "$client" health --server "127.0.0.1:$port" --timeout-ms 2000 >/dev/null 2>&1; do
  if [ "$(podman inspect --format '{{.State.Running}}' "$container")" != true ]; then
    podman logs "$container" >&2 || true
    fail "the container exited before serving"
  fi
  if [ $SECONDS -ge $deadline ]; then
    podman logs "$container" >&2 || true
    fail "the gateway did not become healthy within 180 s"
  fi
  sleep 1
done
say "gateway SERVING"
prompt="The capital of France is"
request=(--prompt "$prompt" --max-new-tokens 12 --temperature 0 --ignore-eos --json)
remote=$("$client" generate --server "127.0.0.1:$port" "${request[@]}") ||
  {
    podman logs "$container" >&2 || true
    fail "generate through the published port failed"
  }
local_run=$("$client" generate --model "$model" "${request[@]}") || fail "local generate failed"
python3 - "$remote" "$local_run" <<'EOF' || fail "generation through the image differs from the host"
import json, sys
remote, local = (json.loads(a) for a in sys.argv[1:3])
print(f"image: {remote['token_ids']} {remote['text']!r}")
print(f"host:  {local['token_ids']} {local['text']!r}")
assert len(remote["token_ids"]) == 12, "expected 12 generated tokens"
assert remote["token_ids"] == local["token_ids"], "token ids differ"
assert remote["prompt_token_ids"] == local["prompt_token_ids"], "prompt token ids differ"
EOF
say "generation through the image: same 12 tokens as in-process on the host"

# --- clean stop ---------------------------------------------------------------
grace=30
stop_start=$SECONDS
podman stop -t "$grace" "$container" >/dev/null
stop_s=$((SECONDS - stop_start))
code=$(podman inspect --format '{{.State.ExitCode}}' "$container")
if [ "$code" != 0 ] || [ "$stop_s" -ge "$grace" ]; then
  podman logs "$container" >&2 || true
  fail "podman stop: exit status $code after ${stop_s} s (want 0 within the ${grace} s grace period)"
fi
logs=$(podman logs "$container" 2>&1)
grep -q 'SIGTERM received' <<<"$logs" || fail "the logs do not show the SIGTERM being handled: $logs"
say "podman stop: exit status 0 after ${stop_s} s"
say "PASS in $((SECONDS - t0)) s"
