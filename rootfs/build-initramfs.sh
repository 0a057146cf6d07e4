#!/usr/bin/env bash
# Builds ember's guest initramfs: the agent as /init plus a static busybox.
#
# Usage: rootfs/build-initramfs.sh
# Prints the image's path (and nothing else) on stdout; progress on stderr.
# The image is cached under ${EMBER_CACHE:-$HOME/.cache/ember}, keyed by the
# agent binary, the busybox package version and this script; the symlink
# initramfs.cpio there points at the latest build (the VMM's default initrd).
set -euo pipefail

script_path="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
repo_root="$(cd "$(dirname "$script_path")/.." && pwd)"
cache_dir="${EMBER_CACHE:-$HOME/.cache/ember}"
target=x86_64-unknown-linux-gnu
busybox=/bin/busybox

log() { printf 'build-initramfs: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Root is needed anyway for mknod of /dev/console; apt-get needs it too.
[[ $(id -u) -eq 0 ]] || die "must run as root (it creates the /dev/console device node)"

# True if the ELF file has no program interpreter, i.e. is statically linked.
is_static() { ! readelf -lW "$1" 2>/dev/null | grep -q 'INTERP'; }

# --- dependencies ------------------------------------------------------------
missing=()
# The dynamic `busybox` package also installs /bin/busybox; only the static
# one runs in a guest without a libc.
if [[ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null || true)" != "install ok installed" ]]; then
    missing+=(busybox-static)
fi
command -v cpio >/dev/null || missing+=(cpio)
command -v readelf >/dev/null || missing+=(binutils)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi
[[ -x $busybox ]] || die "$busybox missing after installing busybox-static"
is_static "$busybox" || die "$busybox is not statically linked"
busybox_version="$(dpkg-query -W -f='${Version}' busybox-static)"

# --- the agent ------------------------------------------------------------------
# An explicit --target keeps RUSTFLAGS away from build scripts and proc
# macros, which are built for the host. Profile settings come in through the
# environment so that the workspace's release profile stays as it is.
# relocation-model=static makes a plain static executable instead of a
# static PIE: no self-relocation at start-up, so none of the copy-on-write
# page faults (~3 ms each in the guest) it would take to patch ~1,700
# pointers. Address randomisation would buy nothing anyway: every clone
# restored from a snapshot shares one layout.
log "building ember-agent (static, release)"
(
    cd "$repo_root"
    RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
        CARGO_PROFILE_RELEASE_STRIP=true \
        CARGO_PROFILE_RELEASE_LTO=true \
        CARGO_PROFILE_RELEASE_OPT_LEVEL=s \
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
        cargo build --release -p ember-agent --target "$target" >&2
)
agent="${CARGO_TARGET_DIR:-$repo_root/target}/$target/release/ember-agent"
[[ -f $agent ]] || die "cargo did not produce $agent"
is_static "$agent" || die "$agent is not statically linked (it has an ELF interpreter)"

# --- cache ---------------------------------------------------------------------
key="$(
    {
        sha256sum <"$agent"
        printf 'busybox-static %s\n' "$busybox_version"
        sha256sum <"$script_path"
    } | sha256sum | cut -c1-16
)"
image="$cache_dir/initramfs-$key.cpio"
link="$cache_dir/initramfs.cpio"
mkdir -p "$cache_dir"

update_link() {
    # Made aside and renamed over, so a reader never sees no link at all.
    ln -sfn "$(basename "$image")" "$link.tmp.$$"
    mv -fT "$link.tmp.$$" "$link"
}

if [[ -f $image ]]; then
    log "cached: $image ($(stat -c %s "$image") bytes)"
    update_link
    printf '%s\n' "$image"
    exit 0
fi

# --- staging tree ----------------------------------------------------------------
staging="$(mktemp -d "${TMPDIR:-/tmp}/ember-initramfs.XXXXXX")"
tmp_image=""
cleanup() {
    rm -rf "$staging"
    [[ -z $tmp_image ]] || rm -f "$tmp_image"
}
trap cleanup EXIT

log "staging in $staging"
cd "$staging"
mkdir -p bin proc sys dev tmp run root etc home
chmod 0755 . bin proc sys dev run etc home
chmod 1777 tmp
chmod 0700 root

install -m 0755 "$agent" init
install -m 0755 "$busybox" bin/busybox
# Applet links made here rather than by `busybox --install` in the guest,
# where each of the hundreds of symlink calls would cost emulated kernel time
# on every boot.
applets=0
while read -r applet; do
    [[ -n $applet && $applet != busybox && ! -e bin/$applet ]] || continue
    ln -s busybox "bin/$applet"
    applets=$((applets + 1))
done < <("$busybox" --list)
[[ -L bin/sh ]] || die "busybox has no sh applet"

# The kernel opens /dev/console for init's stdio before running /init, and
# devtmpfs is not mounted yet at that point.
mknod -m 0600 dev/console c 5 1

cat >etc/passwd <<'EOF'
root:x:0:0:root:/root:/bin/sh
sandbox:x:1000:1000:sandbox:/tmp:/bin/sh
EOF
cat >etc/group <<'EOF'
root:x:0:
sandbox:x:1000:
EOF
chmod 0644 etc/passwd etc/group

# Fixed timestamps, so the same inputs give the same bytes.
find . -exec touch -h -d @0 {} +

# --- pack ------------------------------------------------------------------------
# Uncompressed on purpose: the guest kernel unpacks every byte in emulated
# code, and decompressing costs far more there than copying.
tmp_image="$(mktemp "$cache_dir/.initramfs-$key.XXXXXX")"
find . | LC_ALL=C sort | cpio -o -H newc --owner 0:0 --reproducible --quiet >"$tmp_image"
chmod 0644 "$tmp_image"
mv -f "$tmp_image" "$image"
tmp_image=""
update_link

size=$(stat -c %s "$image")
log "agent $(stat -c %s "$agent") bytes, busybox $busybox_version with $applets applets"
log "built $image: $size bytes ($(((size + 1023) / 1024)) KiB)"
printf '%s\n' "$image"
