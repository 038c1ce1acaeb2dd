# Sourced by scripts/device-check.sh (and usable alone: `source
# scripts/device-env.sh`) on a GPU machine before running a CUDA build of
# dima.
# cudarc opens unversioned names (libnvrtc.so, libcublas.so, libnccl.so)
# or CUDA 12's; a CUDA 13 machine may only have libnvrtc.so.13 and
# libnccl.so.2 (the pip packages' layout). Link the newest of each under
# the names cudarc tries, and put their folders on the library path.
libs=$(mktemp -d)
for name in nvrtc cublas cublasLt nccl; do
  found=$(find /usr/local/cuda*/ /usr/lib /usr/lib64 /opt -name "lib$name.so*" 2>/dev/null | grep -v /stubs/ \
    | sort -V | tail -1)
  if [ -n "$found" ]; then
    ln -sf "$found" "$libs/lib$name.so"
    LD_LIBRARY_PATH="$(dirname "$found"):${LD_LIBRARY_PATH:-}"
    echo "== lib$name: $found"
  else
    echo "== lib$name: not found"
  fi
done
export LD_LIBRARY_PATH="$libs:$LD_LIBRARY_PATH"

