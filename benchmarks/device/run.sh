#!/usr/bin/env bash
# On the lent GPU machine, from the project's root, once .device/a sits in /root/wh (README.md here): install MLX's
# CUDA build, keep MLX's kernel cache under /root, print the machine (GPU, host CPUs, NUMA nodes, the GPU's local
# cores), then run each argument "SECONDS:COMMAND" in turn under that time limit, pinned to the GPU's local cores
# where the machine says which they are (PIN=0: not pinned), each with the seconds elapsed since the start.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MLX_PTX_CACHE_DIR=${MLX_PTX_CACHE_DIR:-/root/ptx}
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-/root/nvcache}
python3 -c "import mlx.core as mx; assert mx.cuda.is_available()" 2>/dev/null || bash .device/b/install.sh || exit 1
# MLX's kernel caches from an earlier machine (README.md here: PACK=1 packs them): the parts kernels.tar.xz.part.*
# found in .device/cache (carried) and /root/cache (copied there by an earlier call), joined in name order
if [ ! -d "$MLX_PTX_CACHE_DIR" ]; then
    parts=$(for p in .device/cache/kernels.tar.xz.part.* /root/cache/kernels.tar.xz.part.*; do
        [ -f "$p" ] && echo "$(basename "$p") $p"; done | sort -u -k1,1 | cut -d" " -f2)
    if [ -n "$parts" ]; then
        # shellcheck disable=SC2086
        if cat $parts | xz -d | tar -x -C /; then
            echo "kernel caches restored from $(echo "$parts" | wc -l) parts: $(du -sh "$MLX_PTX_CACHE_DIR" | cut -f1)"
        else
            echo "kernel caches: the parts did not unpack (a part missing?); compiling afresh"
            rm -rf "$MLX_PTX_CACHE_DIR" "$CUDA_CACHE_PATH"
        fi
    fi
fi
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
lscpu | grep -E "^(Model name|CPU\(s\)|NUMA node)" | tr -s " "
local_cpus=$(nvidia-smi topo -m 2>/dev/null | awk '/^GPU0/ {for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$/ && $i != "0") {print $i; exit}}')
pin=()
if [ "${PIN:-1}" = 1 ] && [ -n "$local_cpus" ]; then
    pin=(taskset -c "$local_cpus")
    echo "GPU0's local cores: $local_cpus (each command pinned to them)"
fi
t0=$SECONDS
for item in "$@"; do
    limit=${item%%:*}
    cmd=${item#*:}
    echo "== [$((SECONDS - t0)) s] $cmd (limit $limit s)"
    timeout "$limit" "${pin[@]}" bash -c "$cmd" 2>&1 | grep -v "Warning"
done
echo "== [$((SECONDS - t0)) s] done"
if [ "${PACK:-0}" = 1 ] && [ -n "${OUT:-}" ] && [ -d "$MLX_PTX_CACHE_DIR" ]; then
    # at most 8 files of 16 MiB come back: parts of 15 MiB
    tar -c -C / "${MLX_PTX_CACHE_DIR#/}" $([ -d "$CUDA_CACHE_PATH" ] && echo "${CUDA_CACHE_PATH#/}") |
        xz -T0 -6 | split -b 15m - "$OUT/kernels.tar.xz.part."
    echo "kernel caches packed ($(du -sh "$MLX_PTX_CACHE_DIR" | cut -f1) of PTX): $(ls "$OUT" | tr "\n" " ")"
fi
