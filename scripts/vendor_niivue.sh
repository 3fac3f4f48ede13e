#!/usr/bin/env bash
# Re-vendor the NiiVue viewer (BSD-2-Clause) from the npm registry into the package, so that
# `pip install` needs no Node.js at run time. Needs npm. Usage: bash scripts/vendor_niivue.sh [VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-0.69.0}
DEST=src/sdfsmis/serve/static
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && npm pack --silent "@niivue/niivue@$VERSION" >/dev/null && tar xzf niivue-niivue-"$VERSION".tgz)
test -s "$TMP/package/dist/niivue.umd.js"
cp "$TMP/package/dist/niivue.umd.js" "$DEST/niivue.umd.js.tmp"
mv "$DEST/niivue.umd.js.tmp" "$DEST/niivue.umd.js"
echo "$VERSION" > "$DEST/NIIVUE_VERSION"
echo "vendored @niivue/niivue $VERSION -> $DEST/niivue.umd.js ($(wc -c < "$DEST/niivue.umd.js") bytes)"
