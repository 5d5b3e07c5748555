#!/bin/sh
# boot.sh DIR CONSOLE TARGET [SYSTEMD LIBDIR]: the first process of the
# private namespaces that systemd_test.go creates with unshare(1). It
# prepares what systemd needs as PID 1 and then becomes it:
#   - the namespace's own loopback, up;
#   - a cgroup2 tree rooted at the cgroup it was started in (the cgroup
#     namespace makes that cgroup the root);
#   - a private /run holding the test's units, in place of the host's;
#   - the pty slave CONSOLE (the test reads its master) over /dev/console,
#     so that systemd's log reaches the test. A regular file does not work:
#     systemd 252 as PID 1 opens /dev/console with open_terminal(), which
#     refuses anything that is not a tty, and then logs nowhere.
# SYSTEMD is the manager to run, the machine's /lib/systemd/systemd by
# default; LIBDIR, if not empty, is where its own libsystemd-shared is, for
# a systemd unpacked into a folder (fetch254.sh). The manager gives its
# services an environment of its own, without LD_LIBRARY_PATH.
# Every mount is private to the namespace: unshare makes propagation private.
set -eu
dir=$1
console=$2
target=$3
systemd=${4:-/lib/systemd/systemd}
libdir=${5:-}
ip link set lo up
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/system
cp "$dir"/units/* /run/systemd/system/
mount --bind "$console" /dev/console
exec env -i container=shellflip-test PATH=/usr/sbin:/usr/bin:/sbin:/bin ${libdir:+"LD_LIBRARY_PATH=$libdir"} \
	"$systemd" --unit="$target" --log-target=console --log-level=info --show-status=no
