#!/usr/bin/env bash
# Fetch, on this machine, the wheels the lent GPU machine's image lacks (it has torch, accelerate,
# transformers, peft, safetensors, pillow, pyyaml, rich, numpy but reaches no registry) into .whl/,
# which git ignores (.git/info/exclude) and `device` carries. Pins are pyproject.toml's; the image's
# python is 3.12. bitsandbytes (43 MB) is left out: with the working tree it would pass the 64 MiB a
# call may carry, so the device check measures model.quantize none / int8 / fp8, not nf4.
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  diffusers==0.42.1 transformers==5.23.0 peft==0.21.2 torchao==0.18.0 accelerate==1.15.0 safetensors==0.8.0
du -sh .whl
