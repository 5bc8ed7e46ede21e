#!/usr/bin/env bash
# Full-page screenshot of a self-contained HTML file with headless Chromium
# (not used by the tests; for looking at report.html). Usage:
#   scripts/screenshot_html.sh FILE.html OUT.png [WIDTH] [HEIGHT]
# Chromium's command line cannot size the window to the page, so HEIGHT
# defaults to a generous estimate from the file's figures and text and the
# blank rows below the page's end are cropped off (with Pillow, if present).
# Pass a larger HEIGHT if the bottom is still cut off.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 FILE.html OUT.png [WIDTH] [HEIGHT]" >&2
  exit 2
fi
html=$1 out=$2 width=${3:-1200}
[[ -f $html ]] || { echo "error: no such file: $html" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[[ -n $browser ]] || { echo "error: chromium not found; install it (apt-get install -y chromium)" >&2; exit 2; }
height=${4:-$(python3 - "$html" "$width" <<'PY'
import base64, re, struct, sys
page = open(sys.argv[1], encoding="utf-8").read()
width = int(sys.argv[2])
content = min(width, 1100) - 48
height = 400
for b64 in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
    w, h = struct.unpack(">II", base64.b64decode(b64[:44])[16:24])
    height += min(h * min(1.0, content / w), 760) + 60
text = re.sub(r"<img[^>]*>|<style>.*?</style>", "", page, flags=re.S)
height += len(re.findall(r"<(?:p|tr|h2|h3|li)\b", text)) * 28 + len(re.sub(r"<[^>]+>", "", text)) / 120 * 24
print(int(1.3 * height))
PY
)}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --screenshot="$out" --window-size="$width,$height" "file://$(realpath "$html")" 2>/dev/null
[[ -s $out ]] || { echo "error: chromium wrote no screenshot" >&2; exit 1; }
python3 - "$out" <<'PY' || true
import sys
from PIL import Image, ImageChops
im = Image.open(sys.argv[1]).convert("RGB")
bottom = im.getpixel((0, im.height - 1))
box = ImageChops.difference(im, Image.new("RGB", im.size, bottom)).getbbox()
if box and box[3] + 24 < im.height:
    im.crop((0, 0, im.width, box[3] + 24)).save(sys.argv[1])
PY
python3 -c "import sys; from PIL import Image; print(sys.argv[1], '%dx%d' % Image.open(sys.argv[1]).size)" "$out" \
  2>/dev/null || echo "$out"
