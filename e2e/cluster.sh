#!/usr/bin/env bash
# A kind cluster for kvpool's e2e tests: create it, build and load the images, install the
# chart, apply an example pool.
#
#   e2e/cluster.sh up cpu|gpu [--no-pool]   create (or reuse) the cluster and install everything
#   e2e/cluster.sh down cpu|gpu             delete the cluster
#
# cpu: e2e/kind-cpu.yaml, the CPU worker image, examples/pool-cpu.yaml (SmolLM2-135M on vLLM's
#      CPU engine). gpu: e2e/kind-gpu.yaml (GPUs injected as nvkind does), the NVIDIA container
#      toolkit and device plugin inside the cluster, the GPU worker image, examples/pool.yaml.
# Needs docker and kind on PATH; helm and kubectl from PATH, else the project's .tools/bin
# (`make tools`). Environment: KVPOOL_E2E_CLUSTER (cluster name, default kvpool-cpu|gpu),
# KVPOOL_NAMESPACE (the operator's, default kvpool-system), KVPOOL_POOL_NAMESPACE (the example
# pool's, default kvpool-demo), NVIDIA_DEVICE_PLUGIN_VERSION (default 0.17.1).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: $0 up|down cpu|gpu [--no-pool]" >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1 flavour=$2 apply_pool=1
[ "${3:-}" = "--no-pool" ] && apply_pool=0
case "$flavour" in cpu|gpu) ;; *) usage ;; esac

cluster=${KVPOOL_E2E_CLUSTER:-kvpool-$flavour}
namespace=${KVPOOL_NAMESPACE:-kvpool-system}
pool_namespace=${KVPOOL_POOL_NAMESPACE:-kvpool-demo}
device_plugin_version=${NVIDIA_DEVICE_PLUGIN_VERSION:-0.17.1}
export PATH="$PATH:$PWD/.tools/bin"
tag=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

step() { printf '\n==> %s\n' "$*" >&2; }
for tool in docker kind helm kubectl; do
    command -v "$tool" >/dev/null || { echo "$0: $tool not found on PATH" >&2; exit 1; }
done

if [ "$action" = down ]; then
    kind delete cluster --name "$cluster"
    exit 0
fi
[ "$action" = up ] || usage

if [ "$flavour" = gpu ]; then
    worker_image=kvpool-worker:$tag
    pool_file=examples/pool.yaml
else
    worker_image=kvpool-worker-cpu:$tag
    pool_file=examples/pool-cpu.yaml
fi

step "cluster $cluster"
if kind get clusters | grep -qx "$cluster"; then
    echo "reusing the existing cluster" >&2
else
    kind create cluster --name "$cluster" --config "e2e/kind-$flavour.yaml" --wait 5m
fi
kubectl config use-context "kind-$cluster" >/dev/null

# Inside each GPU node: the NVIDIA container toolkit as containerd's default runtime (so that
# pods asking for nvidia.com/gpu get the driver without a RuntimeClass), and the driver kept
# from recreating device nodes this node should not see (nvkind's steps).
setup_gpu_node() {
    docker exec "$1" bash -euo pipefail -c '
        if ! command -v nvidia-ctk >/dev/null; then
            apt-get update -qq && apt-get install -y -qq gpg curl >/dev/null
            curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey \
                | gpg --dearmor --yes -o /usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
            curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list \
                | sed "s#deb https://#deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] https://#g" \
                > /etc/apt/sources.list.d/nvidia-container-toolkit.list
            apt-get update -qq && apt-get install -y -qq nvidia-container-toolkit >/dev/null
        fi
        nvidia-ctk runtime configure --runtime=containerd --set-as-default --config-source=command
        systemctl restart containerd
        if ! grep -qx "ModifyDeviceFiles: 0" /proc/driver/nvidia/params; then
            umount -R /proc/driver/nvidia
            cp /proc/driver/nvidia/params /root/gpu-params
            sed -i "s/^ModifyDeviceFiles: 1$/ModifyDeviceFiles: 0/" /root/gpu-params
            mount --bind /root/gpu-params /proc/driver/nvidia/params
        fi
        nvidia-smi -L'
}

if [ "$flavour" = gpu ]; then
    step "NVIDIA container toolkit and device plugin"
    for node in $(kubectl get nodes -l nvidia.com/gpu.present=true -o jsonpath='{.items[*].metadata.name}'); do
        setup_gpu_node "$node"
    done
    helm upgrade --install nvidia-device-plugin nvidia-device-plugin \
        --repo https://nvidia.github.io/k8s-device-plugin --version "$device_plugin_version" \
        --namespace nvidia-device-plugin --create-namespace --wait --timeout 5m
    for _ in $(seq 60); do
        gpus=$(kubectl get nodes -o jsonpath='{.items[*].status.allocatable.nvidia\.com/gpu}')
        [ -n "$gpus" ] && break
        sleep 5
    done
    [ -n "$gpus" ] || { echo "$0: no node reports nvidia.com/gpu" >&2; exit 1; }
    echo "allocatable GPUs per node: $gpus" >&2
fi

step "images kvpool:$tag and $worker_image"
docker build -t "kvpool:$tag" .
if [ "$flavour" = gpu ]; then
    docker build -f Dockerfile.worker -t "$worker_image" .
else
    docker build -f Dockerfile.worker --target cpu-worker \
        --build-arg "KVPOOL_IMAGE=kvpool:$tag" -t "$worker_image" .
fi
kind load docker-image --name "$cluster" "kvpool:$tag" "$worker_image"

step "chart charts/kvpool into namespace $namespace"
helm upgrade --install kvpool charts/kvpool --namespace "$namespace" --create-namespace \
    --set image.tag="$tag" --set image.pullPolicy=Never --wait --timeout 5m
kubectl wait --for condition=Established --timeout 60s crd/kvcachepools.kvpool.dev

if [ "$apply_pool" = 1 ]; then
    step "pool $pool_file into namespace $pool_namespace"
    kubectl create namespace "$pool_namespace" --dry-run=client -o yaml | kubectl apply -f -
    kubectl apply --namespace "$pool_namespace" -f "$pool_file"
    echo "watch it with: kubectl get kvp -n $pool_namespace -w" >&2
fi
