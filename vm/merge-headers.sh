#!/bin/sh
# Runs inside the root image's chroot while run-kernel-suite.sh builds it:
# merges the kernel's two Debian header packages (linux-headers-<ver>-common,
# which /lib/modules/<release>/source points to, and linux-headers-<release>)
# into ONE tree at /var/cache/nodeagent/kernel-headers/<release>, with the
# marker file: the same layout `python -m bpf.headers prepare` (scripts/setup.sh)
# makes, so bcc compiles against this kernel's own headers. bpf/headers.py does
# not accept Debian's split build/ + common trees as installed.
set -eu
release=$1
arch=/usr/src/linux-headers-$release
common=$(readlink -f "/lib/modules/$release/source")
dest=/var/cache/nodeagent/kernel-headers/$release
[ -d "$arch/include" ] || { echo "merge-headers: $arch is missing" >&2; exit 1; }
[ -d "$common/include" ] || { echo "merge-headers: $common (the source tree of $release) is missing" >&2; exit 1; }
rm -rf "$dest"
mkdir -p "$dest"
cp -a "$common/." "$dest/"
cp -a --remove-destination "$arch/." "$dest/"
find "$dest" -xtype l -delete   # links into linux-kbuild that bcc does not need
for f in include/uapi/linux/bpf.h include/generated/autoconf.h arch/x86/include/generated/uapi/asm/unistd_64.h; do
    [ -f "$dest/$f" ] || { echo "merge-headers: the merged tree lacks $f" >&2; exit 1; }
done
echo "linux-headers-$release $(basename "$common")" >"$dest/.nodeagent-complete"
echo "merge-headers: $dest ($(du -sm "$dest" | cut -f1) MB)"
