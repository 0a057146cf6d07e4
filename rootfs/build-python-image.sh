#!/usr/bin/env bash
# Builds a trimmed Debian python3 root filesystem as an ext4 image for ember's
# guests, to be mounted read-only.
#
# Usage: rootfs/build-python-image.sh
# Prints the image's path (and nothing else) on stdout; progress on stderr.
#
# Two cache levels under ${EMBER_CACHE:-$HOME/.cache/ember}:
#   python3-root-<key>.tar  the untouched debootstrap result, keyed by the
#                           suite, the package list, the mirror and the text
#                           of bootstrap_root below (so changing the trimming
#                           or the image does not download again);
#   python3-<key>.ext4      the image, keyed by the above and this script.
# The symlink python3.ext4 there points at the latest build.
#
# Nothing is downloaded except from the Debian mirror this host's apt uses.
set -euo pipefail

script_path="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
cache_dir="${EMBER_CACHE:-$HOME/.cache/ember}"
suite=bookworm
variant=minbase
packages=(python3)
pyver=3.11
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
default_mirror=http://deb.debian.org/debian
# Every file's timestamp in the image, and mke2fs's idea of "now".
epoch=0

log() { printf 'build-python-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap, chroot, apt-get)"

# --- mirror ----------------------------------------------------------------------
# The first `deb` URI for $suite in the host's apt sources: deb822 files first,
# then one-line ones.
find_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        uri="$(awk -v suite="$suite" '
            function flush(   i, n, s, t, u) {
                if (!found && enabled != "no" && uris != "") {
                    n = split(types, t, " "); isdeb = 0
                    for (i = 1; i <= n; i++) if (t[i] == "deb") isdeb = 1
                    n = split(suites, s, " ")
                    for (i = 1; i <= n && isdeb; i++)
                        if (s[i] == suite) { split(uris, u, " "); print u[1]; found = 1; break }
                }
                types = suites = uris = enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ { next }   # continuation lines: not used by these fields here
            {
                c = index($0, ":"); if (!c) next
                key = tolower(substr($0, 1, c - 1)); val = substr($0, c + 1)
                gsub(/^[ \t]+|[ \t]+$/, "", val); gsub(/[ \t]+/, " ", val)
                if (key == "types") types = val
                else if (key == "uris") uris = val
                else if (key == "suites") suites = val
                else if (key == "enabled") enabled = tolower(val)
            }
            END { flush() }' "$f")"
        [[ -z $uri ]] || { printf '%s\n' "$uri"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        uri="$(awk -v suite="$suite" '
            $1 == "deb" {
                i = 2
                if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "$f")"
        [[ -z $uri ]] || { printf '%s\n' "$uri"; return; }
    done
    printf '%s\n' "$default_mirror"
}
mirror="$(find_mirror)"
mirror="${mirror%/}"
[[ $mirror =~ ^(https?|ftp|file):// ]] || die "unusable mirror URI for $suite in apt sources: $mirror"

# --- debootstrap (its result is cached as a tarball) -----------------------------
cleanup_paths=()
cleanup() {
    local p
    for p in "${cleanup_paths[@]}"; do
        rm -rf --one-file-system "$p"
    done
}
trap cleanup EXIT

# Writes the bare debootstrap result to the tarball $1. debootstrap runs in a
# private mount namespace, so its /proc and /sys mounts in the target go away
# with it even if it is killed.
bootstrap_root() {
    local out=$1 dir tmp
    dir="$(mktemp -d "${TMPDIR:-/tmp}/ember-debootstrap.XXXXXX")"
    cleanup_paths+=("$dir")
    log "debootstrap --variant=$variant --include=$(IFS=,; echo "${packages[*]}") $suite from $mirror"
    if ! unshare --mount --propagation private -- \
        debootstrap --variant="$variant" --include="$(IFS=,; echo "${packages[*]}")" \
        --keyring="$keyring" "$suite" "$dir" "$mirror" >&2; then
        [[ ! -f $dir/debootstrap/debootstrap.log ]] || tail -n 30 "$dir/debootstrap/debootstrap.log" >&2
        die "debootstrap failed"
    fi
    tmp="$(mktemp "$out.XXXXXX")"
    cleanup_paths+=("$tmp")
    tar -C "$dir" --numeric-owner --xattrs --xattrs-include='*' -cf "$tmp" .
    chmod 0644 "$tmp"
    mv -f "$tmp" "$out"
    rm -rf --one-file-system "$dir"
}

# --- cache ---------------------------------------------------------------------------
root_key="$(
    {
        printf 'suite %s\nvariant %s\npackages %s\nmirror %s\n' "$suite" "$variant" "${packages[*]}" "$mirror"
        declare -f bootstrap_root
    } | sha256sum | cut -c1-16
)"
key="$(
    {
        printf 'root %s\n' "$root_key"
        sha256sum <"$script_path"
    } | sha256sum | cut -c1-16
)"
root_tar="$cache_dir/python3-root-$root_key.tar"
image="$cache_dir/python3-$key.ext4"
link="$cache_dir/python3.ext4"
mkdir -p "$cache_dir"

update_link() {
    # Made aside and renamed over, so a reader never sees no link at all.
    ln -sfn "$(basename "$image")" "$link.tmp.$$"
    mv -fT "$link.tmp.$$" "$link"
}
cache_hit() {
    log "cached: $image ($(($(stat -c %s "$image") / 1048576)) MiB)"
    update_link
    printf '%s\n' "$image"
    exit 0
}

[[ ! -f $image ]] || cache_hit

# One build at a time; whoever waited finds the image made by the other.
exec 9>>"$cache_dir/.python3.lock"
if ! flock -n 9; then
    log "waiting for another build (lock $cache_dir/.python3.lock)"
    flock 9
fi
[[ ! -f $image ]] || cache_hit

# --- dependencies ----------------------------------------------------------------
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v mkfs.ext4 >/dev/null && command -v e2fsck >/dev/null || missing+=(e2fsprogs)
[[ -f $keyring ]] || missing+=(debian-archive-keyring)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi

start=$SECONDS
if [[ -f $root_tar ]]; then
    log "debootstrap cached: $root_tar"
else
    bootstrap_root "$root_tar"
    log "debootstrap took $((SECONDS - start)) s"
fi

# --- staging tree --------------------------------------------------------------------
staging="$(mktemp -d "${TMPDIR:-/tmp}/ember-python3.XXXXXX")"
cleanup_paths+=("$staging")
root="$staging/root"
mkdir "$root"
log "unpacking into $root"
tar -C "$root" --numeric-owner --xattrs --xattrs-include='*' -xpf "$root_tar"
[[ -x $root/usr/bin/python$pyver ]] || die "no python$pyver in the debootstrap result (suite $suite)"
pylib="usr/lib/python$pyver"

# Runs "$@" chrooted into the tree, with /proc and a /dev/shm (multiprocessing
# semaphores, for compileall -j 0) mounted in a private mount namespace that
# dies with it. With ro=1 in the environment the tree is bind-mounted
# read-only first, as in a guest.
in_root() {
    # shellcheck disable=SC2016 # expanded by the inner sh
    unshare --mount --propagation private -- /bin/sh -ec '
        r=$1; shift
        if [ "${ro:-0}" = 1 ]; then mount --bind "$r" "$r"; mount -o remount,bind,ro "$r"; fi
        mount -t proc proc "$r/proc"
        mount -t tmpfs -o mode=1777,size=64m shm "$r/dev/shm"
        exec chroot "$r" "$@"' sh "$root" \
        /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root PYTHONHASHSEED=0 "$@"
}

# --- trim ------------------------------------------------------------------------------
cd "$root"
rm -rf usr/share/doc usr/share/man usr/share/info usr/share/lintian
# Python keeps its own alias table, but glibc's setlocale reads locale.alias
# (3 KB), so it stays.
if [[ -d usr/share/locale ]]; then
    find usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
fi
rm -rf var/cache/apt/* var/lib/apt/lists/* var/log/* var/cache/debconf/*-old var/lib/dpkg/*-old
# Test suites and GUI/installer parts of the stdlib; nothing else in the
# stdlib imports them.
for d in test idlelib tkinter turtledemo ensurepip lib2to3/tests unittest/test \
    ctypes/test sqlite3/test distutils/tests; do
    rm -rf "${pylib:?}/$d"
done
# Debian's postinst byte-compiled with timestamp pycs; all are redone below.
find usr/lib/python3* -depth -type d -name __pycache__ -exec rm -rf {} +

# --- read-only root ----------------------------------------------------------------
# var/task: where the agent mounts a function's code drive.
mkdir -p proc sys dev dev/shm tmp run var/tmp var/task ember
chmod 0755 proc sys dev run var/task ember
# Binary wheels (numpy, Pillow...) link against these: the trim keeps them.
for lib in libstdc++.so.6 libgcc_s.so.1 libz.so.1; do
    [[ -e usr/lib/x86_64-linux-gnu/$lib ]] || die "the trimmed root lost $lib (binary wheels need it)"
done
chmod 1777 tmp var/tmp dev/shm
grep -q '^sandbox:' etc/passwd || echo 'sandbox:x:1000:1000:sandbox:/tmp:/bin/sh' >>etc/passwd
grep -q '^sandbox:' etc/group || echo 'sandbox:x:1000:' >>etc/group
# debootstrap copies these from the host.
echo ember >etc/hostname
: >etc/resolv.conf

# --- precompile --------------------------------------------------------------------------
# unchecked-hash: the interpreter never stats a source to validate its pyc
# (each stat costs ~5 ms in a guest), and the pycs do not depend on mtimes.
compile_dirs=("/$pylib")
[[ ! -d usr/lib/python3/dist-packages ]] || compile_dirs+=(/usr/lib/python3/dist-packages)
log "compileall ${compile_dirs[*]}"
in_root python3 -m compileall -q -f -j 0 --invalidation-mode unchecked-hash "${compile_dirs[@]}" >&2 ||
    die "compileall failed"

# Every .py must have an unchecked-hash pyc next to it: nothing can be
# written on a read-only root.
# shellcheck disable=SC2016 # Python, not shell
pyc_report="$(in_root python3 -c '
import importlib.util, os, sys
n = missing = wrong = 0
for top in sys.argv[1:]:
    for d, _, files in os.walk(top):
        for f in files:
            if not f.endswith(".py"):
                continue
            n += 1
            p = os.path.join(d, f)
            c = importlib.util.cache_from_source(p)
            try:
                with open(c, "rb") as fh:
                    h = fh.read(16)
            except OSError:
                missing += 1
                print("missing pyc:", p, file=sys.stderr)
                continue
            if int.from_bytes(h[4:8], "little") != 1:
                wrong += 1
                print("not unchecked-hash:", c, file=sys.stderr)
print(n, missing, wrong)
' "${compile_dirs[@]}")" || die "pyc check did not run"
read -r n_py n_missing n_wrong <<<"$pyc_report"
log "pycs: $n_py .py files, $n_missing without pyc, $n_wrong not unchecked-hash"
((n_missing == 0 && n_wrong == 0)) || die "$n_missing .py files lack a pyc, $n_wrong pycs are not unchecked-hash"

# --- verify ------------------------------------------------------------------------------
modules=json,os,sys,io,ctypes,mmap,struct,traceback,inspect,base64,hashlib,random,time,datetime,re
modules+=,collections,typing,dataclasses,urllib.parse,uuid,math,decimal
compgen -G "$pylib/lib-dynload/_sqlite3.*.so" >/dev/null && modules+=,sqlite3
verbose="$staging/import-verbose.log"
out="$(ro=1 in_root python3 -v -c "import ${modules//,/, }; print('ok')" 2>"$verbose")" || {
    tail -n 20 "$verbose" >&2
    die "python3 cannot import $modules in the tree"
}
[[ $out == ok ]] || die "import check printed '$out', not 'ok'"
# With -v, a module compiled from source (no usable pyc) shows as
# "code object from '<...>.py'" instead of '<...>.pyc'.
from_source="$(grep -c "code object from '[^']*\.py'\$" "$verbose" || true)"
((from_source == 0)) || {
    grep "code object from '[^']*\.py'\$" "$verbose" | head >&2
    die "$from_source modules were compiled from source on a read-only root"
}
log "imports ok on a read-only tree ($(grep -c "code object from '[^']*\.pyc'" "$verbose" || true) modules from pycs): ${modules//,/ }"

# Fixed timestamps, after compileall (unchecked-hash pycs ignore them).
find . -exec touch -h -d "@$epoch" {} +

# --- image -------------------------------------------------------------------------------
# Blocks as ext4 with 4 KiB blocks would use them: a block per started 4 KiB of
# a file or directory, and one for a symlink too long for its inode.
read -r n_files n_blocks < <(find . -xdev -printf '%y %s\n' | awk '
    { n++ }
    $1 == "f" || $1 == "d" { b += int(($2 + 4095) / 4096) }
    $1 == "l" && $2 > 59 { b++ }
    END { print n, b }')
n_inodes=$((n_files + n_files / 10 + 1024))
need=$((n_blocks * 4096 + n_inodes * 256))
size_mib=$(((need * 115 / 100 + 1048575) / 1048576))
log "root: $n_files files, $((n_blocks * 4096 / 1000000)) MB in 4 KiB blocks; image ${size_mib} MiB, $n_inodes inodes"

# A fixed UUID (and htree hash seed) per key. SOURCE_DATE_EPOCH and
# E2FSPROGS_FAKE_TIME are honoured by newer e2fsprogs only: bookworm's 1.47.0
# still stamps the superblock and each inode's crtime with the clock, so two
# builds are alike but not byte-identical.
uuid="$(printf '%s' "ember-python3-$key" | sha256sum | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')"
tmp_image="$(mktemp "$cache_dir/.python3-$key.XXXXXX")"
cleanup_paths+=("$tmp_image")
E2FSPROGS_FAKE_TIME=$epoch SOURCE_DATE_EPOCH=$epoch \
    mkfs.ext4 -q -F -d "$root" -L ember-python3 -O ^has_journal -m 0 -I 256 -b 4096 \
    -N "$n_inodes" -U "$uuid" -E "root_owner=0:0,hash_seed=$uuid" \
    "$tmp_image" "${size_mib}M" >&2 || die "mkfs.ext4 failed"
e2fsck -fn "$tmp_image" >&2 || die "e2fsck found problems in the new image"
chmod 0644 "$tmp_image"
mv -f "$tmp_image" "$image"
update_link

log "built $image: $size_mib MiB in $((SECONDS - start)) s"
printf '%s\n' "$image"
