# Sourced by the GPU scripts: puts CUDA, NVRTC and NCCL libraries (system or pip's nvidia-*
# packages) on LD_LIBRARY_PATH for cudarc's dynamic loading.
for dir in /usr/local/cuda/lib64 /usr/local/nvidia/lib64 \
    $(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true) \
    $(python3 -c 'import nvidia.cuda_nvrtc, os; print(os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], "lib"))' 2>/dev/null || true); do
    [[ -d "$dir" ]] && export LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
done
# cudarc opens libnccl.so; pip ships libnccl.so.2 only.
for dir in ${LD_LIBRARY_PATH:+${LD_LIBRARY_PATH//:/ }}; do
    if [[ -e "$dir/libnccl.so.2" && ! -e "$dir/libnccl.so" ]]; then
        mkdir -p /tmp/zoo-libs && ln -sf "$dir/libnccl.so.2" /tmp/zoo-libs/libnccl.so
        export LD_LIBRARY_PATH="/tmp/zoo-libs:$LD_LIBRARY_PATH"
    fi
done

