#!/usr/bin/env bash
# What `rl train` needs on a GPU machine that has torch, transformers and vLLM (installed separately),
# but neither Ray nor the graders, and no network: Ray, math-verify and their dependencies for CPython 3.12, plus
# an entry-point record so vLLM's spawned engine cores load this project's plugin (rollout.vllm_plugin). Ray's
# wheel alone is larger than one upload to an offline machine, so the site goes in chunks.
#
# On a machine with the network, from the repo's root:   bash scripts/gpu_site.sh        (writes .gpu-rl/, ignored)
# On the GPU machine, one command per chunk, back to back (its /tmp must survive between them):
#   each chunk but the last, with .gpu-rl/cK and .gpu-rl/bin carried:  bash .gpu-rl/bin/stash.sh
#   the last (and later commands while /tmp/rlsite exists):             source .gpu-rl/bin/stage.sh && ...
# After vLLM's own environment is set up (both add to PYTHONPATH).
set -euo pipefail
OUT=${1:-.gpu-rl}
START=$PWD
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
P=""; for n in 17 24 27 28 31 34 35 39; do P="$P --platform manylinux_2_${n}_x86_64"; done
P="$P --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d "$W/wh" \
  ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
python3 -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
  --implementation cp $P --target "$W/site" "$W"/wh/*.whl
# Ray's dashboard, its bundled client and the Java/C++ pieces are never used by a local `ray.init`.
rm -rf "$W/site/ray/dashboard/client" "$W/site/ray/jars" "$W/site/ray/cpp" "$W/site/bin"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
meta="$W/site/rl_reasoning-$version.dist-info"
mkdir -p "$meta"
printf 'Metadata-Version: 2.1\nName: rl-reasoning\nVersion: %s\n' "$version" > "$meta/METADATA"
sed -n '/^\[project.entry-points\."vllm.general_plugins"\]/,/^$/p' pyproject.toml \
  | sed -e 's/^\[project.entry-points\."vllm.general_plugins"\]/[vllm.general_plugins]/' -e 's/"//g' \
  > "$meta/entry_points.txt"
grep -q "rollout.vllm_plugin:register" "$meta/entry_points.txt" || { echo "no vllm plugin entry point found"; exit 1; }
cd "$W" && tar -cf - -C site . | xz -6 -T2 > site.tar.xz
split -b "${CHUNK_MB:-50}M" -d site.tar.xz part.
cd "$START"
rm -rf "$OUT"; mkdir -p "$OUT/bin"
n=0; for p in "$W"/part.*; do mkdir -p "$OUT/c$n"; mv "$p" "$OUT/c$n/"; n=$((n+1)); done
echo $n > "$OUT/bin/nparts"
sha256sum "$W/site.tar.xz" | cut -c1-16 > "$OUT/bin/sha"
cat > "$OUT/bin/stash.sh" <<'EOF'
#!/usr/bin/env bash
# On the GPU machine, for each chunk but the last: keep it in /tmp/rlparts for the last command.
D=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p /tmp/rlparts && cp "$D"/c*/part.* /tmp/rlparts/ && ls -la /tmp/rlparts
EOF
cat > "$OUT/bin/stage.sh" <<'EOF'
#!/usr/bin/env bash
# Source it: joins and unpacks the site into /tmp/rlsite once, then puts it and the repo on PYTHONPATH.
D=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ ! -f /tmp/rlsite/ray/__init__.py ]; then
  mkdir -p /tmp/rlparts && cp "$D"/c*/part.* /tmp/rlparts/ 2>/dev/null
  have=$(ls /tmp/rlparts/part.* 2>/dev/null | wc -l)
  if [ "$have" -ne "$(cat "$D/bin/nparts")" ]; then
    echo "have $have of $(cat "$D/bin/nparts") chunks: the machine went cold between calls; start again from the first"
    return 3 2>/dev/null || exit 3
  fi
  cat /tmp/rlparts/part.* > /tmp/rlsite.tar.xz
  [ "$(sha256sum /tmp/rlsite.tar.xz | cut -c1-16)" = "$(cat "$D/bin/sha")" ] || { echo "checksum mismatch"; return 4 2>/dev/null || exit 4; }
  mkdir -p /tmp/rlsite && tar -xJf /tmp/rlsite.tar.xz -C /tmp/rlsite && rm -f /tmp/rlsite.tar.xz
fi
export PYTHONPATH="$(cd "$D/.." && pwd):/tmp/rlsite${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0
python3 -c "import ray, math_verify; print('ray', ray.__version__, 'math_verify ok')"
EOF
chmod +x "$OUT/bin/"*.sh
if git rev-parse --git-dir >/dev/null 2>&1; then
  ex="$(git rev-parse --git-dir)/info/exclude"; mkdir -p "$(dirname "$ex")"
  grep -qx "/$OUT/" "$ex" 2>/dev/null || echo "/$OUT/" >> "$ex"
fi
du -sh "$OUT"/c*
echo "ready: $n chunk(s) in $OUT"
