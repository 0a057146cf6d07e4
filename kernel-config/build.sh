#!/usr/bin/env bash
# Build ember's guest kernel (Linux 6.1 vmlinux, PVH ELF) from Debian's
# linux-source-6.1 with ember.config and patches/*.patch, into a cache keyed by
# their content. Prints ONLY the vmlinux path on stdout; progress goes to stderr.
#
# Environment:
#   EMBER_CACHE               cache root (default: $HOME/.cache/ember)
#   EMBER_KEEP_KERNEL_BUILD=1 keep the (large) build tree after the build
#   EMBER_KERNEL_JOBS         parallel make jobs (default: nproc)
set -euo pipefail
export LC_ALL=C

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/ember.config"
self="$here/build.sh"
src_tarball=/usr/src/linux-source-6.1.tar.xz
src_pkg=linux-source-6.1
deps=(linux-source-6.1 build-essential flex bison libelf-dev libssl-dev bc cpio xz-utils)

log() { printf '[ember-kernel] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- Build dependencies (apt only; nothing else is downloaded) -------------
installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}
missing=()
for p in "${deps[@]}"; do installed "$p" || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing missing packages: ${missing[*]}"
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "need root (or sudo) to install: ${missing[*]}"
        sudo=(sudo)
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
[ -f "$src_tarball" ] || die "$src_tarball not found after installing $src_pkg"

# --- Cache key ---------------------------------------------------------------
shopt -s nullglob
patches=("$here"/patches/*.patch)   # glob order is sorted
shopt -u nullglob
src_version="$(dpkg-query -W -f='${Version}' "$src_pkg")"
key="$(
    for f in "$fragment" "${patches[@]}" "$self"; do
        printf '== %s\n' "${f#"$here"/}"
        cat "$f"
    done
    printf '== %s %s\n' "$src_pkg" "$src_version"
    # The toolchain shapes the code too: a compiler or linker upgrade rebuilds.
    printf '== %s\n' "$(gcc --version | head -n 1)" "$(ld --version | head -n 1)"
)"
key="$(printf '%s' "$key" | sha256sum | cut -c1-16)"

cache_root="${EMBER_CACHE:-$HOME/.cache/ember}"
out="$cache_root/kernel-$key"
mkdir -p "$out"

update_default_link() {
    # $cache_root/vmlinux -> kernel-<key>/vmlinux, replaced atomically.
    ln -sfn "kernel-$key/vmlinux" "$cache_root/.vmlinux.tmp.$$"
    mv -Tf "$cache_root/.vmlinux.tmp.$$" "$cache_root/vmlinux"
}

# A killed build of any key leaves gigabytes of build tree: remove those
# whose builder is gone (its lock is free), also when this key is built.
for lock in "$cache_root"/kernel-*/.lock; do
    [ -e "$lock" ] && [ "$lock" != "$out/.lock" ] || continue
    (
        exec 8>"$lock"
        flock -n 8 || exit 0
        rm -rf "$(dirname "$lock")"/build.*
    )
done

if [ -f "$out/vmlinux" ]; then
    update_default_link
    printf '%s\n' "$out/vmlinux"
    exit 0
fi

# One build per key at a time; a second caller waits and then finds vmlinux.
exec 9>"$out/.lock"
if ! flock -n 9; then
    log "another build of kernel-$key is running; waiting for it"
    flock 9
fi
if [ -f "$out/vmlinux" ]; then
    update_default_link
    printf '%s\n' "$out/vmlinux"
    exit 0
fi
rm -rf "$out"/build.*   # leftovers of an interrupted build

# Inherited make/cargo jobserver settings would confuse the kernel build.
unset MAKEFLAGS MFLAGS MAKELEVEL CROSS_COMPILE
export ARCH=x86_64 KBUILD_BUILD_USER=ember KBUILD_BUILD_HOST=ember

build="$(mktemp -d "$out/build.XXXXXX")"
cleanup() {
    if [ "${EMBER_KEEP_KERNEL_BUILD:-0}" = 1 ]; then
        log "build tree kept: $build/linux"
    else
        rm -rf "$build"
    fi
}
trap cleanup EXIT
start=$SECONDS
elapsed() { printf '%dm%02ds' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)); }

log "kernel-$key: building ($src_pkg $src_version) in $build"
log "unpacking $src_tarball"
tar -xf "$src_tarball" -C "$build"
mv "$build/linux-source-6.1" "$build/linux"
cd "$build/linux"

for p in "${patches[@]}"; do
    log "applying ${p#"$here"/}"
    patch -p1 --forward --batch --quiet <"$p" >&2
done

# --- Configuration -------------------------------------------------------------
log "make tinyconfig + ember.config + olddefconfig (log: $out/config.log)"
{
    make tinyconfig &&
        scripts/kconfig/merge_config.sh -m .config "$fragment" &&
        make olddefconfig
} >"$out/config.log" 2>&1 || { tail -n 30 "$out/config.log" >&2; die "configuration failed"; }

# Every CONFIG_X=value / "# CONFIG_X is not set" line of the fragment must hold
# (catches typos and options whose dependencies are not met). An option that
# is absent from .config counts as "not set".
mismatches="$(awk '
    function parse(line, kv) {
        if (match(line, /^CONFIG_[A-Za-z0-9_]+=/)) {
            kv[1] = substr(line, 1, RLENGTH - 1); kv[2] = substr(line, RLENGTH + 1); return 1
        }
        if (match(line, /^# CONFIG_[A-Za-z0-9_]+ is not set$/)) {
            kv[1] = substr(line, 3, RLENGTH - 13); kv[2] = "n"; return 1
        }
        return 0
    }
    FNR == NR { if (parse($0, kv)) want[kv[1]] = kv[2]; next }
    { if (parse($0, kv)) have[kv[1]] = kv[2] }
    END {
        for (k in want) {
            h = (k in have) ? have[k] : "n"
            if (h != want[k]) printf "  %s: wanted %s, got %s\n", k, want[k], h
        }
    }' "$fragment" .config | sort)"
# A "not set" line for a symbol that exists in no Kconfig file is a typo.
known="$(find . -name 'Kconfig*' -type f -exec cat {} + |
    awk '$1 == "config" || $1 == "menuconfig" { print "CONFIG_" $2 }' | sort -u)"
unknown="$(sed -n 's/^# \(CONFIG_[A-Za-z0-9_]*\) is not set$/\1/p; s/^\(CONFIG_[A-Za-z0-9_]*\)=.*/\1/p' "$fragment" |
    sort -u | comm -23 - <(printf '%s\n' "$known"))"
if [ -n "$unknown" ]; then
    mismatches="$(printf '%s\n%s' "$mismatches" "$(printf '%s\n' "$unknown" | sed 's/^/  /; s/$/: no such Kconfig symbol/')")"
    mismatches="${mismatches#$'\n'}"
fi
if [ -n "$mismatches" ]; then
    cp .config "$out/config.rejected"
    die "$(printf 'ember.config does not hold in the final .config (see %s):\n%s' \
        "$out/config.rejected" "$mismatches")"
fi
log "config verified: $(grep -c '^CONFIG_.*=\|^# CONFIG_.* is not set' "$fragment") fragment lines hold"

# --- Compile -------------------------------------------------------------------
jobs="${EMBER_KERNEL_JOBS:-$(nproc)}"
buildlog="$out/build.log"
log "make -j$jobs vmlinux (full log: $buildlog)"
set +e
make -j"$jobs" vmlinux 2>&1 | tee "$buildlog" | {
    n=0
    while IFS= read -r line; do
        case "$line" in
        "  CC "* | "  AS "*)
            n=$((n + 1))
            if [ $((n % 100)) -eq 0 ]; then log "$n files compiled, $(elapsed)"; fi
            ;;
        "  LD "*vmlinux* | "  KSYMS "* | "  SORTTAB "*) log "${line#  } ($(elapsed))" ;;
        esac
    done
}
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
    log "make failed (exit $status) after $(elapsed); errors and tail of $buildlog:"
    grep -E 'error:|Error [0-9]' "$buildlog" | head -20 >&2 || true
    tail -n 40 "$buildlog" >&2
    exit 1
fi

# --- Install into the cache (vmlinux last: its presence marks completion) ----
cp .config "$out/.config.tmp.$$" && mv -f "$out/.config.tmp.$$" "$out/config"
cp vmlinux "$out/.vmlinux.tmp.$$" && mv -f "$out/.vmlinux.tmp.$$" "$out/vmlinux"
update_default_link
log "done in $(elapsed): $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes)"
printf '%s\n' "$out/vmlinux"
