#!/bin/sh
# fetch254.sh DIR: puts systemd 254 from Debian's bookworm-backports in DIR,
# unpacked, not installed: DIR/lib/systemd/systemd and DIR/bin/systemctl, to
# run with LD_LIBRARY_PATH=DIR/usr/lib/<triplet>/systemd, where their own
# libsystemd-shared-254.so is. The machine's systemd and its apt state are
# left alone: apt reads a sources file of this script's and keeps its lists
# and downloads in a temporary folder.
#
# .ci/run calls it, and so do the systemd tests when DIR is missing. It does
# nothing if DIR exists. Concurrent callers queue on DIR.lock, and DIR
# appears whole or not at all: the packages are unpacked beside it, checked,
# and then renamed into place.
set -eu
dest=${1:?usage: fetch254.sh DIR}
suite=bookworm-backports
major=254

fail() {
	echo "fetch254.sh: $*" >&2
	if [ -s "${tmp:-}/log" ]; then
		sed 's/^/	/' "$tmp/log" >&2
	fi
	exit 1
}

if [ -x "$dest/lib/systemd/systemd" ]; then
	echo "fetch254.sh: $dest is there already"
	exit 0
fi
mkdir -p "$(dirname "$dest")"
exec 9>"$dest.lock"
flock -w 300 9 || fail "another fetch held $dest.lock for 5 minutes"
if [ -x "$dest/lib/systemd/systemd" ]; then
	exit 0 # fetched by whoever held the lock
fi
if [ -e "$dest" ]; then
	fail "$dest exists but has no lib/systemd/systemd; remove it"
fi

tmp=$(mktemp -d "$dest.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# The archive that the machine's own sources name for bookworm; the suite
# is signed by the same Debian archive key.
uri=$(apt-get indextargets --format '$(REPO_URI)' 'Release: bookworm' 'Target-Of: deb' | head -n 1)
if [ -z "$uri" ]; then
	fail "this machine's apt sources have no Debian bookworm archive to take $suite from"
fi
cat >"$tmp/backports.sources" <<EOF
Types: deb
URIs: $uri
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
mkdir "$tmp/lists" "$tmp/lists/partial" "$tmp/cache" "$tmp/debs" "$tmp/root"
# apt downloads as its own user, _apt, into what that user may write.
chmod 755 "$tmp"
if id _apt >/dev/null 2>&1; then
	chown _apt "$tmp/lists/partial" "$tmp/debs"
fi
apt() {
	apt-get -q -o Dir::Etc::sourcelist="$tmp/backports.sources" -o Dir::Etc::sourceparts=- \
		-o Dir::State::Lists="$tmp/lists" -o Dir::Cache="$tmp/cache" \
		-o APT::Update::Error-Mode=any -o Acquire::Retries=3 "$@"
}
apt update >"$tmp/log" 2>&1 || fail "apt-get update of $suite failed:"
(cd "$tmp/debs" && apt download -t "$suite" systemd libsystemd-shared) >>"$tmp/log" 2>&1 ||
	fail "apt-get download of systemd and libsystemd-shared from $suite failed:"
for deb in "$tmp"/debs/*.deb; do
	dpkg-deb -x "$deb" "$tmp/root"
done

lib=$(ls -d "$tmp"/root/usr/lib/*/systemd/libsystemd-shared-*.so 2>/dev/null | head -n 1)
if [ -z "$lib" ] || [ ! -x "$tmp/root/lib/systemd/systemd" ] || [ ! -x "$tmp/root/bin/systemctl" ]; then
	fail "the packages from $suite do not have lib/systemd/systemd, bin/systemctl and libsystemd-shared where expected"
fi
version=$(LD_LIBRARY_PATH=$(dirname "$lib") "$tmp/root/lib/systemd/systemd" --version | head -n 1)
case $version in
"systemd $major "*) ;;
*) fail "$suite has \"$version\", not systemd $major: the tests and this script need updating" ;;
esac
mv "$tmp/root" "$dest"
echo "fetch254.sh: $version in $dest"
